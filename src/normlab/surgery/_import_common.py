"""What the Keras and Flax importers share (:mod:`normlab.surgery.importers`): the source's values
as read (:class:`_Source`), arrays bound to their names and checked, the axis and rank rules, the
agreement of explicit arguments with the source, and the normlab layer built from it all."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..layers.batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

_NORMLAB_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_NORMLAB_RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_KERAS_ROOTS = ("keras", "tf_keras", "tensorflow")


class _Unset:
    """A keyword that was not passed (None means "absent", e.g. a layer with scale=False)."""

    def __repr__(self) -> str:
        return "<not given>"


_UNSET: Any = _Unset()


@dataclass
class _Source:
    """What an import reads from the source, whichever way it was given."""

    gamma: Any
    beta: Any
    mean: Any
    var: Any
    decay: float | None  # the framework's momentum (weight of the old value); None: its default
    eps: float | None  # None: the framework's default
    dim: int
    renorm: dict = field(default_factory=dict)  # r_max, d_max for a BatchRenorm; empty: BatchNorm


# --- arrays -------------------------------------------------------------------------------------


def _vector(name: str, value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{where}: {name} must be a 1-D array with one value per channel, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: {name} has NaN or infinite values; the source layer's state is broken.")
    return array


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _is_arraylike(value: Any) -> bool:
    return value is None or isinstance(value, (np.ndarray, torch.Tensor, list, tuple)) or hasattr(value, "__array__")


def _bind_arrays(
    where: str,
    args: tuple,
    named: dict[str, Any],
    flags: tuple[tuple[str, bool | None], tuple[str, bool | None]],
    call: str,
    renorm_weights: bool,
) -> tuple[dict[str, Any], list[float]]:
    """Assign positional and keyword arrays to their names, and never by a guess.

    ``named`` maps the four names in positional order (scale, shift, mean, variance) to what was
    passed by keyword (``_UNSET`` if nothing); ``flags`` are the source's ``(scale flag, shift
    flag)`` names and values (None: not given); ``call`` is the layer way, for the messages.
    Trailing numbers among ``args`` are momentum and epsilon (the older signature). Returns the
    arrays by name (None where absent) and those numbers.
    """
    order = tuple(named)
    end = len(args)
    while end and _is_number(args[end - 1]):
        end -= 1
    arrays, scalars = args[:end], [float(a) for a in args[end:]]
    if len(scalars) > 2:
        raise TypeError(f"{where}: after the arrays, at most two numbers (momentum, epsilon) may be passed "
                        f"positionally, got {len(scalars)}: {scalars}.")
    for value in arrays:
        if _is_number(value):
            raise TypeError(f"{where}: got the number {value!r} among the arrays; pass momentum= and epsilon= by "
                            f"keyword.")
        if not _is_arraylike(value):
            raise TypeError(f"{where}: expected arrays or the source layer ({call}), got {_describe(value)}.")
    (scale_name, has_scale), (shift_name, has_shift) = flags
    if not arrays:
        positional: dict[str, Any] = {}
    elif has_scale is None and has_shift is None:
        # Four arrays are the older signature's (scale, shift, mean, variance); fewer are
        # completed by keyword. Anything else is a weights list whose layout is unknown.
        unfilled = [n for n in order[max(len(arrays), 2):] if named[n] is _UNSET]
        if len(arrays) > 4 or unfilled:
            raise TypeError(
                f"{where}: got {len(arrays)} positional arrays, which cannot be told apart by position: a layer's "
                f"weights list holds 2 to 7 arrays depending on its {scale_name}, {shift_name}"
                f"{' and renorm' if renorm_weights else ''} settings (with {scale_name}=False it starts with "
                f"{order[1]}). Pass the layer itself: {call}; or give {scale_name}= and {shift_name}= so the "
                f"positions are known; or pass the arrays by name ({', '.join(f'{n}=...' for n in order)})."
            )
        positional = dict(zip(order, arrays))
    else:
        if has_scale is None or has_shift is None:
            missing = scale_name if has_scale is None else shift_name
            raise TypeError(f"{where}: give both {scale_name}= and {shift_name}= (missing {missing}=) to read "
                            f"positional arrays in a weights list's order; or pass the layer itself: {call}.")
        layout = [n for n, present in zip(order, (has_scale, has_shift, True, True)) if present]
        if renorm_weights and len(arrays) == len(layout) + 3:
            raise ValueError(
                f"{where}: got {len(arrays)} arrays with {scale_name}={has_scale}, {shift_name}={has_shift}: the "
                f"weights of a layer with renorm=True ({', '.join(layout)}, then moving_stddev, renorm_mean, "
                f"renorm_stddev). Its renorm settings are in its configuration, not its weights: pass the layer "
                f"itself, {call[:-1]}, renorm=...)."
            )
        if len(arrays) != len(layout):
            raise TypeError(
                f"{where}: with {scale_name}={has_scale} and {shift_name}={has_shift} the weights are "
                f"({', '.join(layout)}): {len(layout)} arrays, got {len(arrays)}. Check the flags against the "
                f"source, or pass the layer itself: {call}."
            )
        positional = dict(zip(layout, arrays))
    for name in positional:
        if named[name] is not _UNSET:
            raise TypeError(f"{where}: got {name} both positionally and as {name}=; pass it once.")
    values = {n: positional.get(n, None if named[n] is _UNSET else named[n]) for n in order}
    for (flag_name, present), name in zip(flags, order):
        if present is True and values[name] is None:
            raise ValueError(f"{where}: {flag_name}=True but no {name} was given; pass {name}= (or "
                             f"{flag_name}=False if the source has none).")
        if present is False and values[name] is not None:
            raise ValueError(f"{where}: {flag_name}=False but a {name} was given; the source either has a "
                             f"{name} ({flag_name}=True) or not.")
    return values, scalars


def _numbers(where: str, scalars: list[float], momentum: Any, epsilon: Any) -> tuple[Any, Any]:
    """The momentum and epsilon given positionally (older signature) or by keyword, not both."""
    given = dict(zip(("momentum", "epsilon"), scalars))
    for name, value in (("momentum", momentum), ("epsilon", epsilon)):
        if name in given and value is not None:
            raise TypeError(f"{where}: got {name} both positionally ({given[name]!r}) and as {name}={value!r}.")
    return given.get("momentum", momentum), given.get("epsilon", epsilon)


def _float(where: str, name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__} {value!r}.")
    return float(value)


# --- layers -------------------------------------------------------------------------------------


def _root(cls: type) -> str:
    return cls.__module__.split(".")[0]


def _is_keras_layer(obj: Any) -> bool:
    return any(_root(c) in _KERAS_ROOTS and c.__name__ == "Layer" for c in type(obj).__mro__)


def _is_keras_bn(obj: Any) -> bool:
    return any(_root(c) in _KERAS_ROOTS and c.__name__ == "BatchNormalization" for c in type(obj).__mro__)


def _flax_kind(obj: Any) -> str | None:
    """``"linen"``/``"nnx"`` for a Flax BatchNorm, ``"other"`` for another Flax module, else None."""
    mro = type(obj).__mro__
    for kind in ("linen", "nnx"):
        if any(c.__name__ == "BatchNorm" and c.__module__.startswith(f"flax.{kind}") for c in mro):
            return kind
    return "other" if any(c.__module__.startswith("flax.") for c in mro) else None


def _describe(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _single_axis(where: str, axis: Any, source: str) -> int:
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"{where}: the {source} normalizes over axis={list(axis)}: several feature axes, so its statistics "
                f"are per position, not per channel. normlab's batch norms take a single channel axis."
            )
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{where}: the {source}'s axis must be an int, got {type(axis).__name__} {axis!r}.")
    return int(axis)


def _dim_for(where: str, axis: int, rank: int | None, dim: int | None, source: str) -> int:
    """BatchNorm1d/2d/3d from the channel axis and (when known) the input rank."""
    fix = ("normlab normalizes per channel, along axis 1 (channels-first, as torch) or along the last axis "
           "(channels-last, the Keras/Flax default; permute the input with x.movedim(-1, 1))")
    if rank is None:
        if axis not in (-1, 1):
            raise ValueError(f"{where}: the {source} normalizes over axis={axis}, and its input rank is not "
                             f"recorded; {fix}: axis must be -1 or 1.")
        chosen = 2 if dim is None else dim
    else:
        if not 2 <= rank <= 5:
            raise ValueError(f"{where}: the {source} was built for {rank}-D input; normlab's batch norms take 2-D "
                             f"to 5-D input (BatchNorm1d: 2-D or 3-D, BatchNorm2d: 4-D, BatchNorm3d: 5-D).")
        position = axis + rank if axis < 0 else axis
        if position not in (1, rank - 1):
            raise ValueError(f"{where}: the {source} normalizes over axis={axis} of its {rank}-D input, which is "
                             f"neither the channel axis 1 nor the last axis; {fix}.")
        chosen = 1 if rank <= 3 else rank - 2
        if dim is not None and dim != chosen:
            raise ValueError(f"{where}: dim={dim} contradicts the {source}, built for {rank}-D input (dim {chosen}); "
                             f"omit dim= (it is read from the layer).")
    return chosen


def _flag(where: str, name: str, value: Any) -> bool | None:
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{where}: {name} must be True, False or None (read from the source), got "
                        f"{type(value).__name__} {value!r}.")
    return None if value is None else bool(value)


def _agree(where: str, source: str, given: dict[str, Any], actual: dict[str, Any]) -> None:
    """Explicit arguments may repeat the source's settings but never contradict them."""
    for name, value in given.items():
        if value is None:
            continue
        have = actual[name]
        if isinstance(have, bool):
            same = _flag(where, name, value) == have
        else:
            same = math.isclose(_float(where, name, value), have, rel_tol=1e-6, abs_tol=0.0)
        if not same:
            raise ValueError(f"{where}: {name}={value!r} contradicts the {source}, whose {name} is {have!r}; omit "
                             f"{name}= (it is read from the source), or change the source.")


def _check_dim(where: str, dim: Any) -> None:
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim not in (1, 2, 3)):
        raise ValueError(f"{where}: dim must be 1, 2 or 3 (BatchNorm1d/2d/3d), got {dim!r}.")


# --- building -----------------------------------------------------------------------------------


def _build(where: str, source: _Source, kwargs: dict, dtype: torch.dtype) -> nn.Module:
    if source.dim not in (1, 2, 3):
        raise ValueError(f"{where}: dim must be 1, 2 or 3 (BatchNorm1d/2d/3d), got {source.dim!r}.")
    arrays = {"gamma/scale": _vector("gamma", source.gamma, where), "beta/bias": _vector("beta", source.beta, where),
              "mean": _vector("mean", source.mean, where), "variance": _vector("variance", source.var, where)}
    if arrays["mean"] is None or arrays["variance"] is None:
        raise ValueError(f"{where}: the moving mean and variance are required, got None.")
    sizes = {k: a.size for k, a in arrays.items() if a is not None}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: every array needs one value per channel, got sizes {sizes}.")
    if (arrays["variance"] < 0).any():
        raise ValueError(f"{where}: the moving variance has negative values ({arrays['variance'].min():g}); "
                         f"a variance is >= 0.")
    channels = arrays["mean"].size
    gamma, beta = arrays["gamma/scale"], arrays["beta/bias"]
    affine = gamma is not None or beta is not None
    cls = (_NORMLAB_RENORM if source.renorm else _NORMLAB_BN)[source.dim]
    # gamma without beta (Keras center=False, Flax use_bias=False) is exactly a weight without a
    # bias; beta without gamma has no such form: a weight of ones, frozen, holds the missing gamma.
    bn = cls(channels, affine=affine, dtype=dtype, bias=beta is not None or gamma is None, **kwargs, **source.renorm)
    with torch.no_grad():
        if affine:
            for param, value in ((bn.weight, gamma), (bn.bias, beta)):
                if param is None:
                    continue
                if value is None:
                    param.requires_grad_(False)
                else:
                    param.copy_(torch.from_numpy(value))
        bn.running_mean.copy_(torch.from_numpy(arrays["mean"]))
        bn.running_var.copy_(torch.from_numpy(arrays["variance"]))
    return bn.eval()
