"""Checks at the door shared by the functional API and the layers: one rule, one message.

Each raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value)
whose message names the caller (``owner``: a layer's label or a function's name), states the
rule, shows the value received and says how to fix it.

>>> import torch
>>> check_tensor(torch.zeros(2, 3), "BatchNorm1d(3)")
>>> check_tensor([[0.0, 1.0]], "BatchNorm1d(3)")
Traceback (most recent call last):
...
TypeError: BatchNorm1d(3): input must be a torch.Tensor, got list; convert it with torch.as_tensor(x, dtype=torch.float32).
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

__all__ = ["check_eps", "check_finite_number", "check_float_stats", "check_normalized_shape", "check_tensor"]


def check_tensor(input: object, owner: str, *, integers: bool = False) -> None:
    """Raise a ``TypeError`` unless ``input`` is a floating-point tensor.

    Normalizing integers, booleans or complex numbers is undefined in torch's kernels (they
    raise ``NotImplementedError`` deep inside) and would round the result; ``integers=True``
    also accepts integer and bool tensors (a frozen norm's affine map promotes them to float, as
    torchvision's ``FrozenBatchNorm2d`` does).
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"{owner}: input must be a torch.Tensor, got {type(input).__name__}; convert it with "
                        f"torch.as_tensor(x, dtype=torch.float32).")
    if input.is_floating_point() or (integers and not input.is_complex()):
        return
    raise TypeError(
        f"{owner}: input must be a floating-point tensor (float32, float64, float16 or bfloat16), got "
        f"{input.dtype}; convert it with x.float() (for 8-bit images, x.float() / 255)."
    )


def check_finite_number(value: object, name: str, owner: str, hint: str = "") -> None:
    """Raise unless ``value`` is a real, finite number (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: {name} must be a finite number{hint}, got {type(value).__name__} {value!r}.")
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be a finite number{hint}, got {value!r}.")


def check_eps(eps: object, owner: str) -> None:
    """Raise unless ``eps`` is a finite number > 0.

    eps keeps a constant channel (variance 0) finite: with ``eps=0`` such a channel normalizes to
    0/0 = NaN instead of the bias; an infinite or NaN eps makes every output the bias or NaN.

    >>> check_eps(0.0, "BatchNorm2d(3)")
    Traceback (most recent call last):
    ...
    ValueError: BatchNorm2d(3): eps must be a finite number > 0 (typically 1e-5; it keeps constant channels finite), got 0.0.
    """
    hint = " > 0 (typically 1e-5; it keeps constant channels finite)"
    check_finite_number(eps, "eps", owner, hint)
    if not eps > 0:
        raise ValueError(f"{owner}: eps must be a finite number{hint}, got {eps!r}.")


def check_float_stats(owner: str, **tensors: Tensor | None) -> None:
    """Running statistics must be floating point: an integer buffer would truncate every update
    (a running mean of integers stays 0)."""
    for key, t in tensors.items():
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{owner}: {key} must be a floating-point tensor (float32 for running statistics), got "
                            f"{t.dtype}; convert it with {key}.float().")



def check_normalized_shape(shape: tuple, owner: str) -> None:
    """Raise unless ``shape`` (a layer/RMS norm's ``normalized_shape``) is a non-empty tuple of ints
    > 0: a zero size normalizes nothing (every input is empty) and a negative one cannot exist."""
    if not shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral) or d <= 0 for d in shape):
        raise ValueError(
            f"{owner}: normalized_shape must be a positive int or a non-empty sequence of positive ints (the "
            f"trailing sizes of the input, e.g. x.shape[-1:]), got {list(shape) if shape else shape!r}."
        )
