"""The norms whose statistics are per sample: :func:`instance_norm`, :func:`layer_norm`,
:func:`group_norm`, :func:`rms_norm`."""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import checks as _checks
from .. import stats as _stats
from ..stats import statistics_dtype
from . import _numerics as N


class InstanceNormResult(NamedTuple):
    """What :func:`instance_norm` returns; fields as in :class:`BatchNormResult`."""

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    updated: Tensor | None


def instance_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> InstanceNormResult:
    """Instance normalization: statistics per sample and channel over the spatial dimensions.

    ``y[n, c] = (x[n, c] - mean[n, c]) / sqrt(var[n, c] + eps) * weight[c] + bias[c]``. With
    running statistics and ``use_input_stats``, they move towards the batch average of the
    per-instance means and unbiased variances (torch's rule) and are returned; the arguments
    stay untouched. With ``use_input_stats=False`` every instance uses the running statistics.

    Args:
        input: ``(N, C, L, ...)`` with at least one spatial dimension.
        running_mean, running_var: ``(C,)`` or None.
        weight, bias: ``(C,)`` or None.

    Returns:
        :class:`InstanceNormResult` ``(output, running_mean, running_var, updated)``.

    >>> import torch
    >>> instance_norm(torch.arange(6.0).reshape(1, 2, 3)).output
    tensor([[[-1.2247,  0.0000,  1.2247],
             [-1.2247,  0.0000,  1.2247]]])
    """
    _checks.check_tensor(input, "instance_norm")
    _checks.check_eps(eps, "instance_norm")
    _checks.check_float_stats("instance_norm", running_mean=running_mean, running_var=running_var)
    if input.dim() < 3:
        raise ValueError(
            f"instance_norm: input must be (N, C, L, ...) with at least one spatial dimension, got "
            f"shape {tuple(input.shape)}; for an unbatched (C, L) input use x.unsqueeze(0)."
        )
    N.check_per_channel(
        input, input.shape[1], "instance_norm",
        running_mean=running_mean, running_var=running_var, weight=weight, bias=bias,
    )
    _stats.check_momentum(momentum, owner="instance_norm")
    if momentum is None:
        raise ValueError("instance_norm: momentum=None is not supported (torch has no cumulative "
                         "average for instance norm); give a float in [0, 1].")
    spatial = math.prod(input.shape[2:])
    if use_input_stats and spatial == 1:
        raise ValueError(
            f"instance_norm: each instance needs more than one spatial value to compute a variance, "
            f"got input of shape {tuple(input.shape)}."
        )
    acc = statistics_dtype(input.dtype)
    w, b = N.cast(weight, acc), N.cast(bias, acc)
    if input.numel() == 0:
        return InstanceNormResult(N.empty_output(input, w, b), running_mean, running_var, None)
    if acc != input.dtype and w is None and running_mean is not None:
        # torch's kernel casts running statistics to the input's dtype unless given float32
        # affine parameters; the identity ones keep the running averages in float32.
        w = torch.ones(input.shape[1], dtype=acc, device=input.device)
        b = torch.zeros_like(w)
    if running_mean is None or not use_input_stats:
        rm, rv = N.cast(running_mean, acc), N.cast(running_var, acc)
        out = F.instance_norm(input, rm, rv, w, b, use_input_stats, momentum, eps)
        return InstanceNormResult(out, running_mean, running_var, None)
    rm, rv = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
    out = F.instance_norm(input, rm, rv, w, b, True, momentum, eps)
    updated = N.finite_flag(rm, rv)
    new_mean = torch.where(updated, rm.to(running_mean.dtype), running_mean)
    new_var = torch.where(updated, rv.to(running_var.dtype), running_var)
    return InstanceNormResult(out, new_mean, new_var, updated)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Layer normalization over the trailing ``normalized_shape`` dimensions (as torch).

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, statistics per leading index;
    float32 statistics for 16-bit input.

    >>> import torch
    >>> layer_norm(torch.tensor([[1.0, 3.0]]), 2)
    tensor([[-1.0000,  1.0000]])
    """
    shape = _as_shape(normalized_shape, "layer_norm")
    _checks.check_tensor(input, "layer_norm")
    _checks.check_eps(eps, "layer_norm")
    _check_trailing(input, shape, "layer_norm", weight=weight, bias=bias)
    return F.layer_norm(input, shape, N.match_input(weight, input), N.match_input(bias, input), eps)


def group_norm(
    input: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    name: str = "group_norm",
) -> Tensor:
    """Group normalization: channels split into ``num_groups`` groups, statistics per sample and group.

    ``y = (x - mean[n, g]) / sqrt(var[n, g] + eps) * weight[c] + bias[c]`` for input ``(N, C, *)``.
    Each group must hold more than one value (``C / num_groups * prod(*) > 1``): a group of one
    value would output the bias whatever the input (``ValueError``; torch checks only a batch
    of one). ``name``: the caller in messages.

    >>> import torch
    >>> group_norm(torch.tensor([[1.0, 3.0, 0.0, 2.0]]), 2)
    tensor([[-1.0000,  1.0000, -1.0000,  1.0000]])
    """
    _checks.check_tensor(input, name)
    _checks.check_eps(eps, name)
    if input.dim() < 2:
        raise ValueError(f"{name}: input must be (N, C, *), got shape {tuple(input.shape)}.")
    channels = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral) or num_groups <= 0 or channels % num_groups:
        raise ValueError(
            f"{name}: the {channels} channels must split evenly into num_groups groups, got "
            f"num_groups={num_groups!r}; choose a divisor of {channels}."
        )
    N.check_per_channel(input, channels, name, weight=weight, bias=bias)
    per_group = channels // num_groups * math.prod(input.shape[2:])
    if per_group == 1 and input.numel():
        # Every value is its group's mean: the output would be the bias whatever the input.
        raise ValueError(
            f"{name}: each group must hold more than one value to compute its statistics, got one "
            f"({channels // num_groups} channel(s) per group x {math.prod(input.shape[2:])} position(s)) for "
            f"input of shape {tuple(input.shape)} and num_groups={num_groups}; use fewer groups (a divisor of "
            f"{channels} below {num_groups}), or LayerNorm over the features."
        )
    return F.group_norm(input, num_groups, N.match_input(weight, input), N.match_input(bias, input), eps)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float | None = None,
) -> Tensor:
    """Root-mean-square normalization over the trailing ``normalized_shape`` dimensions.

    ``y = x / sqrt(mean(x^2) + eps) * weight``; ``eps=None`` means ``torch.finfo(input.dtype).eps``
    (torch's default). 16-bit input is computed in float32 and returned in its dtype.

    >>> import torch
    >>> rms_norm(torch.tensor([[3.0, 4.0]]), 2, eps=1e-12)
    tensor([[0.8485, 1.1314]])
    """
    shape = _as_shape(normalized_shape, "rms_norm")
    _checks.check_tensor(input, "rms_norm")
    if eps is not None:
        _checks.check_eps(eps, "rms_norm")
    _check_trailing(input, shape, "rms_norm", weight=weight)
    if eps is None:
        eps = torch.finfo(input.dtype).eps
    acc = statistics_dtype(input.dtype)
    if acc != input.dtype:
        return F.rms_norm(input.to(acc), shape, N.cast(weight, acc), eps).to(input.dtype)
    return F.rms_norm(input, shape, N.match_input(weight, input), eps)


def _as_shape(normalized_shape: int | Sequence[int], where: str) -> tuple[int, ...]:
    shape = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else tuple(normalized_shape)
    _checks.check_normalized_shape(shape, where)
    return shape


def _check_trailing(input: Tensor, shape: tuple[int, ...], where: str, **tensors: Tensor | None) -> None:
    if tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ValueError(
            f"{where}: the input's trailing dimensions must equal normalized_shape={list(shape)}, got "
            f"input of shape {tuple(input.shape)}; pass normalized_shape=x.shape[-k:] for the last k dims."
        )
    for name, t in tensors.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{where}: {name} must have shape {shape}, got {tuple(t.shape)}.")
