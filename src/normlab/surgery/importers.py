"""Import batch norms from Keras and Flax: :func:`batchnorm_from_keras`, :func:`batchnorm_from_flax`.

Pass the source layer itself, and everything is read from it: the arrays by their names, and
epsilon, momentum, axis, center/scale (``use_scale``/``use_bias``) and Keras's renorm settings
from its configuration, so that nothing falls back silently to a default::

    bn = batchnorm_from_keras(keras_layer)                 # keras.layers.BatchNormalization, built
    bn = batchnorm_from_flax(linen_module, variables)      # flax.linen.BatchNorm + its variables
    bn = batchnorm_from_flax(nnx_module)                   # flax.nnx.BatchNorm

Arrays are accepted too (the older API, kept): ``batchnorm_from_keras(gamma, beta, moving_mean,
moving_variance, momentum=..., epsilon=...)`` and ``batchnorm_from_flax(**params, **batch_stats,
momentum=..., epsilon=...)``; there momentum and epsilon default to the framework's defaults.

Conventions (see :mod:`normlab.stats`). Keras and Flax compute at inference
``y = (x - mean) / sqrt(var + epsilon) * gamma + beta`` and, in training,
``moving = decay * moving + (1 - decay) * batch`` with the *biased* batch variance: their
``momentum`` is a decay, the weight of the old value. The result is a normlab
``BatchNorm1d/2d/3d`` in eval mode with ``momentum = 1 - decay`` (torch's meaning), ``eps = epsilon``
and ``unbiased=False``: its inference is exactly the source's, and further training updates the
statistics as the source would. A gamma (scale) or beta (bias) the source does not have is
a constant 1 or 0 there: ``affine=True`` with that parameter frozen (``requires_grad=False``), so
training leaves it as the source would; neither gives ``affine=False``.

Layout. Keras and Flax default to channels-last (``axis=-1``): ``(N, H, W, C)``. normlab's
layers, like torch's, are channels-first ``(N, C, H, W)``: give them ``x.movedim(-1, 1)`` (for 4-D
input, ``x.permute(0, 3, 1, 2)``: a view in torch's channels_last memory format, no copy, the same
numbers) and turn the output back with ``y.movedim(1, -1)``. A source normalizing over axis 1
(channels-first) needs no permute; any other axis is not a single channel axis and is refused.

``dim`` (BatchNorm1d, 2d or 3d) is read from a built Keras layer's input rank (2-D or 3-D input:
1, 4-D: 2, 5-D: 3). Flax modules and arrays do not record the rank: ``dim`` is then 2 unless given
(the three classes differ only in the input rank they accept, never in the numbers).

What is not imported: cross-device statistics (Keras ``synchronized=True``, Flax ``axis_name``)
give a single-process batch norm (use :func:`normlab.surgery.convert_sync_batchnorm` for
distributed training); a Keras layer with ``trainable=False``, which Keras runs in inference mode
even when training, is imported as it is: keep the result in eval mode, or freeze it with
:func:`normlab.surgery.freeze_bn`. Keras's batch renormalization: see :func:`batchnorm_from_keras`.

>>> import numpy as np, torch
>>> bn = batchnorm_from_keras(np.ones(2), np.zeros(2), np.array([1.0, 2.0]), np.array([4.0, 9.0]),
...                           momentum=0.9, epsilon=1e-3, dim=1)
>>> type(bn).__name__, round(bn.momentum, 6), bn.eps, bn.unbiased, bn.training
('BatchNorm1d', 0.1, 0.001, False, False)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from .. import stats as _stats
from ..layers.batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ..layers.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

__all__ = ["batchnorm_from_flax", "batchnorm_from_keras"]

_NORMLAB_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
_NORMLAB_RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}
_KERAS_ROOTS = ("keras", "tf_keras", "tensorflow")
_RENORM_CHOICES = ("error", "batchnorm", "batchrenorm")
_KERAS_CALL = "batchnorm_from_keras(layer)"
_FLAX_CALL = "batchnorm_from_flax(module, variables) for flax.linen, batchnorm_from_flax(module) for flax.nnx"


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


def _keras_name(variable: Any) -> str:
    # Keras 3: "gamma"; tf.keras 2: "batch_normalization/gamma:0".
    return str(getattr(variable, "name", "")).rsplit("/", 1)[-1].split(":", 1)[0]


def _keras_renorm_limits(where: str, config: dict) -> dict:
    """normlab's constant r_max and d_max for Keras's renorm_clipping; raise where none match."""
    clipping = dict(config.get("renorm_clipping") or {})
    rmax, rmin, dmax = clipping.get("rmax"), clipping.get("rmin"), clipping.get("dmax")
    decay, renorm_decay = float(config["momentum"]), float(config.get("renorm_momentum", config["momentum"]))
    if not math.isclose(decay, renorm_decay, rel_tol=1e-9):
        raise ValueError(
            f"{where}: renorm='batchrenorm' needs the layer's renorm_momentum to equal its momentum, got "
            f"renorm_momentum={renorm_decay} and momentum={decay}: Keras corrects towards separate renorm statistics "
            f"averaged with renorm_momentum, normlab's BatchRenorm towards its running statistics. Use "
            f"renorm='batchnorm' (exact inference, training without the corrections)."
        )
    if rmax is None:
        if rmin not in (None, 0, 0.0):
            raise ValueError(f"{where}: the layer clips r to [rmin={rmin}, inf); normlab's BatchRenorm clips to "
                             f"[1/r_max, r_max] and cannot bound r from below alone. Use renorm='batchnorm'.")
        r_max = math.inf
    else:
        if rmin is None or not math.isclose(float(rmin) * float(rmax), 1.0, rel_tol=1e-6):
            raise ValueError(
                f"{where}: the layer clips r to [rmin={0 if rmin is None else rmin}, rmax={rmax}] (Keras's rmin "
                f"is 0 when not given); normlab's BatchRenorm clips to [1/r_max, r_max], so rmin must be 1/rmax = "
                f"{1 / float(rmax):g}. Set renorm_clipping={{'rmax': {rmax}, 'rmin': {1 / float(rmax)!r}, ...}} "
                f"in Keras, or use renorm='batchnorm'."
            )
        r_max = float(rmax)
    return {"r_max": r_max, "d_max": math.inf if dmax is None else float(dmax)}


def _from_keras_layer(where: str, layer: Any, dim: int | None, renorm: str) -> tuple[_Source, dict]:
    config = layer.get_config()
    label = f"Keras layer {getattr(layer, 'name', '?')!r}"
    weights = list(layer.weights)
    if not weights:
        raise ValueError(f"{where}: the {label} is not built, so it has no weights yet; call it on an input "
                         f"(or layer.build(input_shape)) first.")
    values = dict(zip([_keras_name(v) for v in weights], layer.get_weights()))
    for option in ("virtual_batch_size", "adjustment"):
        if config.get(option) is not None:
            raise ValueError(f"{where}: the {label} sets {option}={config[option]!r} (tf.keras 2), which normlab's "
                             f"batch norm does not have; the import would not compute what the layer computes.")
    flags = {"scale": bool(config.get("scale", True)), "center": bool(config.get("center", True))}
    for flag, name in (("scale", "gamma"), ("center", "beta")):
        if flags[flag] != (name in values):
            raise ValueError(f"{where}: the {label} has {flag}={flags[flag]} but its weights are {sorted(values)}.")
    for name in ("moving_mean", "moving_variance"):
        if name not in values:
            raise ValueError(f"{where}: the {label} has no {name} among its weights {sorted(values)}.")
    axis = _single_axis(where, config.get("axis", -1), label)
    rank = getattr(getattr(layer, "input_spec", None), "ndim", None)
    source = _Source(values.get("gamma"), values.get("beta"), values["moving_mean"], values["moving_variance"],
                     float(config["momentum"]), float(config["epsilon"]), _dim_for(where, axis, rank, dim, label))
    if config.get("renorm"):
        if renorm == "error":
            raise ValueError(
                f"{where}: the {label} uses batch renormalization (renorm=True). Its inference is batch norm with "
                f"moving_mean and moving_variance and imports exactly, but normlab cannot train as it does: Keras "
                f"corrects towards separate renorm_mean/renorm_stddev (renorm_momentum) and averages the standard "
                f"deviation, normlab's BatchRenorm corrects towards its running statistics and averages the "
                f"variance. Choose renorm='batchnorm' (a BatchNorm: exact inference, training without the "
                f"corrections) or renorm='batchrenorm' (a BatchRenorm with the layer's clipping: exact inference, "
                f"training as documented in batchnorm_from_keras)."
            )
        if renorm == "batchrenorm":
            source.renorm = _keras_renorm_limits(where, config)
    return source, {"momentum": float(config["momentum"]), "epsilon": float(config["epsilon"]), **flags}


def _variable_value(variable: Any) -> Any:
    """The array in a flax.nnx Variable (None for an absent parameter)."""
    if variable is None:
        return None
    if hasattr(variable, "get_value"):
        return variable.get_value()
    return getattr(variable, "value", variable)


def _from_flax_module(
    where: str, kind: str, module: Any, variables: Mapping | None, dim: int | None
) -> tuple[_Source, dict]:
    label = f"flax.{kind}.BatchNorm"
    flags = {"use_scale": bool(module.use_scale), "use_bias": bool(module.use_bias)}
    if kind == "nnx":
        if variables is not None:
            raise TypeError(f"{where}: a flax.nnx.BatchNorm holds its own values; pass it alone: "
                            f"batchnorm_from_flax(module).")
        scale, bias = _variable_value(module.scale), _variable_value(module.bias)
        mean, var = _variable_value(module.mean), _variable_value(module.var)
    else:
        if variables is None:
            if getattr(module, "scope", None) is None:
                raise TypeError(
                    f"{where}: a flax.linen.BatchNorm holds no values; pass its variables too: "
                    f"batchnorm_from_flax(module, variables), with variables = {{'params': ..., "
                    f"'batch_stats': ...}} as module.init/apply return them (for a BatchNorm inside a model: "
                    f"{{'params': v['params'][name], 'batch_stats': v['batch_stats'][name]}}), or a bound module."
                )
            variables = module.variables
        if not isinstance(variables, Mapping):
            raise TypeError(f"{where}: variables must be a mapping with 'params' and 'batch_stats', got "
                            f"{type(variables).__name__}.")
        params, stats = variables.get("params", {}), variables.get("batch_stats")
        hint = ("pass this BatchNorm's own variables; for one inside a model: {'params': v['params'][name], "
                "'batch_stats': v['batch_stats'][name]}")
        if not isinstance(stats, Mapping) or not {"mean", "var"} <= set(stats):
            raise ValueError(f"{where}: variables['batch_stats'] must hold 'mean' and 'var', got "
                             f"{sorted(stats) if isinstance(stats, Mapping) else stats!r}; {hint}.")
        unknown = sorted(set(stats) - {"mean", "var"}) + sorted(set(params) - {"scale", "bias"})
        if unknown:
            raise ValueError(f"{where}: variables hold {unknown}, which a BatchNorm does not have; {hint}.")
        scale, bias, mean, var = params.get("scale"), params.get("bias"), stats["mean"], stats["var"]
    for flag, name, value in (("use_scale", "scale", scale), ("use_bias", "bias", bias)):
        if flags[flag] != (value is not None):
            raise ValueError(f"{where}: the {label} has {flag}={flags[flag]} but its variables "
                             f"{'lack' if flags[flag] else 'have'} '{name}'; are these this module's variables?")
    axis = _single_axis(where, module.axis, label)
    decay, eps = float(module.momentum), float(module.epsilon)
    source = _Source(scale, bias, mean, var, decay, eps, _dim_for(where, axis, None, dim, label))
    return source, {"momentum": decay, "epsilon": eps, **flags}


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
    bn = cls(channels, affine=affine, dtype=dtype, **kwargs, **source.renorm)
    with torch.no_grad():
        if affine:
            # The source's missing gamma (beta) is the constant 1 (0): frozen, so training keeps it so.
            for param, value in ((bn.weight, gamma), (bn.bias, beta)):
                if value is None:
                    param.requires_grad_(False)
                else:
                    param.copy_(torch.from_numpy(value))
        bn.running_mean.copy_(torch.from_numpy(arrays["mean"]))
        bn.running_var.copy_(torch.from_numpy(arrays["variance"]))
    return bn.eval()


def batchnorm_from_keras(
    *weights: Any,
    gamma: Any = _UNSET,
    beta: Any = _UNSET,
    moving_mean: Any = _UNSET,
    moving_variance: Any = _UNSET,
    momentum: float | None = None,
    epsilon: float | None = None,
    center: bool | None = None,
    scale: bool | None = None,
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
    renorm: Literal["error", "batchnorm", "batchrenorm"] = "error",
) -> nn.Module:
    """A normlab batch norm (in eval mode) equal to a Keras ``BatchNormalization`` layer.

    Keras computes ``(x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta`` at
    inference, and in training ``moving = momentum * moving + (1 - momentum) * batch`` with the
    biased batch variance. The result gets ``momentum = 1 - momentum`` (torch's meaning),
    ``eps = epsilon`` and ``unbiased=False``, so both agree in inference and in training. Its
    input is channels-first: permute a channels-last ``(N, H, W, C)`` input with
    ``x.movedim(-1, 1)`` and the output back with ``y.movedim(1, -1)`` (see the module docstring).

    Three ways to call it:

    * ``batchnorm_from_keras(layer)``: a built Keras 3 (or tf.keras) ``BatchNormalization``. Its
      weights are read by name (gamma, beta, moving_mean, moving_variance), and momentum,
      epsilon, center, scale, axis and the renorm settings from ``layer.get_config()``; ``dim``
      from the rank it was built for. ``momentum=``, ``epsilon=``, ``center=``, ``scale=``,
      ``dim=`` may be passed too, but must agree with the layer.
    * ``batchnorm_from_keras(gamma, beta, moving_mean, moving_variance, momentum=..., epsilon=...)``
      (the older API): four arrays, gamma or beta None where the layer has ``scale=False`` /
      ``center=False``; or by name, an absent one omitted. momentum and epsilon may follow the
      arrays positionally, and default to Keras's 0.99 and 1e-3.
    * ``batchnorm_from_keras(*layer.get_weights(), center=..., scale=...)``: ``get_weights()``
      returns 2 to 7 arrays depending on center, scale and renorm, so positional arrays other
      than four are read in that order only when ``center`` and ``scale`` are both given, and
      otherwise raise a ``TypeError`` rather than being misassigned. (A renorm layer's seven
      arrays raise too: its settings are in its configuration; pass the layer.)

    Batch renormalization (``renorm=True``; Keras >= 3.14). Inference is batch norm with
    moving_mean and moving_variance, and imports exactly. Keras's training cannot be reproduced
    exactly, so ``renorm`` chooses, and its default refuses:

    * ``"error"`` (default): raise ``ValueError`` saying what differs.
    * ``"batchnorm"``: a ``BatchNorm``: exact inference; training is batch norm (momentum from
      ``momentum``) without the r and d corrections.
    * ``"batchrenorm"``: a ``BatchRenorm1d/2d/3d`` (:mod:`normlab.layers.renorm`) with constant
      ``r_max = rmax`` and ``d_max = dmax`` from ``renorm_clipping`` (inf where not given):
      exact inference. Keras's corrections ``r = clip(sqrt(var_B + eps) / renorm_stddev, rmin, rmax)``
      and ``d = clip((mu_B - renorm_mean) / renorm_stddev, -dmax, dmax)`` (``renorm_stddev``
      floored at ``sqrt(eps)``) become normlab's, which put ``sqrt(running_var + eps)`` and the
      running mean in place of ``renorm_stddev`` and ``renorm_mean``. So a training step's output
      is Keras's exactly while ``renorm_mean == moving_mean`` and
      ``renorm_stddev == sqrt(moving_variance + eps)``: Keras keeps both from its first training
      step on when ``renorm_momentum == momentum`` (required here); a layer never trained
      (``renorm_stddev = 1``, ``sqrt(moving_variance + eps) = sqrt(1 + eps)``) differs in its
      first step. The running mean is updated as Keras does. The running variance is not: Keras
      averages the standard deviation, ``s <- m s + (1 - m) sqrt(var_B + eps)``, and stores
      ``moving_variance = s^2 - eps``, while normlab averages the variance,
      ``v <- m v + (1 - m) var_B``; from the same state, one step leaves normlab's larger by
      ``m (1 - m) (s - sqrt(var_B + eps))^2`` (``m`` Keras's momentum, ``s`` its moving_stddev
      before the step), a second-order gap that further steps carry on.
      Raises ``ValueError`` where ``renorm_momentum != momentum``, or the clipping is not
      ``[1/rmax, rmax]`` (Keras's ``rmin`` is 0 when not given).

    Args:
        *weights: a Keras layer, or arrays (above).
        gamma, beta, moving_mean, moving_variance: ``(C,)`` arrays by name (NumPy, torch, or
            anything ``np.asarray`` takes); gamma/beta None or omitted where absent.
        momentum: Keras's momentum, a decay (arrays: default 0.99).
        epsilon: Keras's epsilon (arrays: default 1e-3).
        center, scale: whether the layer has beta / gamma (arrays: read from which are given).
        dim: 1, 2 or 3 for BatchNorm1d, 2d or 3d (a layer: its rank; arrays: default 2).
        dtype: of the parameters (statistics stay float32 for 16-bit dtypes).
        renorm: what a ``renorm=True`` layer becomes (above); ignored for other layers.

    Raises:
        TypeError: an object that is neither a Keras ``BatchNormalization`` nor arrays;
            positional arrays that cannot be told apart; a value given twice.
        ValueError: an unbuilt layer; an axis that is not a single channel axis; explicit
            arguments that contradict the layer; renorm as above; arrays of the wrong shape,
            non-finite values, or a negative variance.

    Example, from arrays (a layer: ``bn = batchnorm_from_keras(layer)``)::

    >>> import numpy as np, torch
    >>> bn = batchnorm_from_keras(np.ones(2), np.zeros(2), np.array([1.0, 2.0]), np.array([4.0, 9.0]), dim=1)
    >>> bn.momentum, bn.eps, bn.unbiased
    (0.010000000000000009, 0.001, False)
    >>> bn(torch.tensor([[3.0, 5.0]]))
    tensor([[0.9999, 0.9999]], grad_fn=<NativeBatchNormBackward0>)
    >>> w = [np.zeros(2), np.array([1.0, 2.0]), np.array([4.0, 9.0])]  # get_weights(), scale=False
    >>> batchnorm_from_keras(*w, scale=False, center=True, dim=1).weight.requires_grad
    False
    """
    where = "batchnorm_from_keras"
    if renorm not in _RENORM_CHOICES:
        raise ValueError(f"{where}: renorm must be one of {list(_RENORM_CHOICES)}, got {renorm!r}.")
    _check_dim(where, dim)
    named = {"gamma": gamma, "beta": beta, "moving_mean": moving_mean, "moving_variance": moving_variance}
    layers = [w for w in weights if _is_keras_layer(w) or _flax_kind(w) is not None]
    if layers:
        layer = layers[0]
        if _flax_kind(layer) is not None:
            raise TypeError(f"{where}: got a Flax module ({_describe(layer)}); use batchnorm_from_flax.")
        if not _is_keras_bn(layer):
            raise TypeError(f"{where}: expected a keras.layers.BatchNormalization, got {_describe(layer)}.")
        if len(weights) != 1 or any(v is not _UNSET for v in named.values()):
            raise TypeError(f"{where}: pass either a Keras layer or arrays, not both: batchnorm_from_keras(layer).")
        source, actual = _from_keras_layer(where, layer, dim, renorm)
        _agree(where, f"Keras layer {layer.name!r}", {"momentum": momentum, "epsilon": epsilon, "center": center,
                                                       "scale": scale}, actual)
    else:
        flags = (("scale", _flag(where, "scale", scale)), ("center", _flag(where, "center", center)))
        values, scalars = _bind_arrays(where, weights, named, flags, _KERAS_CALL,
                                       renorm_weights=True)
        decay, eps = _numbers(where, scalars, momentum, epsilon)
        source = _Source(values["gamma"], values["beta"], values["moving_mean"], values["moving_variance"],
                         _float(where, "momentum", decay), _float(where, "epsilon", eps), 2 if dim is None else dim)
    return _build(where, source, _stats.from_keras(source.decay, source.eps), dtype)


def batchnorm_from_flax(
    *args: Any,
    variables: Mapping | None = None,
    scale: Any = _UNSET,
    bias: Any = _UNSET,
    mean: Any = _UNSET,
    var: Any = _UNSET,
    momentum: float | None = None,
    epsilon: float | None = None,
    use_scale: bool | None = None,
    use_bias: bool | None = None,
    dim: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A normlab batch norm (in eval mode) equal to a Flax ``BatchNorm`` (linen or nnx).

    Flax computes ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with its running
    ``mean`` and ``var`` at inference, and in training ``ra = momentum * ra + (1 - momentum) * batch``
    with the biased batch variance; the result gets ``momentum = 1 - momentum``,
    ``eps = epsilon`` and ``unbiased=False``. Flax is channels-last (``axis=-1``) by default:
    permute the input with ``x.movedim(-1, 1)`` (see the module docstring).

    Three ways to call it:

    * ``batchnorm_from_flax(module, variables)``: a ``flax.linen.BatchNorm`` and its variables,
      ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}`` as ``init``/``apply``
      return them (for a BatchNorm inside a model, ``{"params": v["params"][name],
      "batch_stats": v["batch_stats"][name]}``), or a bound module alone.
    * ``batchnorm_from_flax(module)``: a ``flax.nnx.BatchNorm`` (its ``scale``/``bias`` are
      None when ``use_scale``/``use_bias`` is False).

      Both read momentum, epsilon, axis, use_scale and use_bias from the module;
      ``momentum=``, ``epsilon=``, ``use_scale=``, ``use_bias=`` may be passed too, but must agree.
    * ``batchnorm_from_flax(**params, **batch_stats, momentum=..., epsilon=...)`` (the older API):
      arrays by name; a missing ``scale``/``bias`` (Flax's params lack them when off) is absent.
      Four positional arrays ``(scale, bias, mean, var)`` work too; fewer or more need
      ``use_scale=`` and ``use_bias=``. momentum and epsilon default to Flax's 0.99 and 1e-5.

    The input rank is not recorded in Flax: ``dim`` (BatchNorm1d/2d/3d) is 2 unless given, and
    the axis must be -1 (channels-last) or 1 (channels-first).

    Raises:
        TypeError: a linen module without variables; an nnx module with them; an object that is
            neither a Flax ``BatchNorm`` nor arrays; a value given twice.
        ValueError: variables that are not this module's (missing, extra or unexpected keys);
            an axis other than -1 or 1; explicit arguments that contradict the module; arrays
            of the wrong shape, non-finite values, or a negative variance.

    Example, from arrays (modules: ``batchnorm_from_flax(module, variables)``)::

    >>> import numpy as np
    >>> bn = batchnorm_from_flax(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), momentum=0.9)
    >>> type(bn).__name__, round(bn.momentum, 6), bn.eps, bn.unbiased
    ('BatchNorm2d', 0.1, 1e-05, False)
    >>> params, batch_stats = {"bias": np.zeros(3)}, {"mean": np.zeros(3), "var": np.ones(3)}  # use_scale=False
    >>> batchnorm_from_flax(**params, **batch_stats).weight.requires_grad
    False
    """
    where = "batchnorm_from_flax"
    _check_dim(where, dim)
    named = {"scale": scale, "bias": bias, "mean": mean, "var": var}
    kind = _flax_kind(args[0]) if args else None
    if kind is None and any(_is_keras_layer(a) for a in args):
        raise TypeError(f"{where}: got a Keras layer; use batchnorm_from_keras.")
    if kind == "other":
        raise TypeError(f"{where}: expected a flax.linen.BatchNorm or flax.nnx.BatchNorm, got {_describe(args[0])}.")
    if kind is not None:
        if len(args) > 2 or any(v is not _UNSET for v in named.values()):
            raise TypeError(f"{where}: pass either a Flax module (with its variables) or arrays, not both.")
        if len(args) == 2:
            if variables is not None:
                raise TypeError(f"{where}: got variables both positionally and as variables=; pass them once.")
            variables = args[1]
        source, actual = _from_flax_module(where, kind, args[0], variables, dim)
        _agree(where, f"flax.{kind}.BatchNorm", {"momentum": momentum, "epsilon": epsilon, "use_scale": use_scale,
                                                 "use_bias": use_bias}, actual)
    else:
        if variables is not None:
            raise TypeError(f"{where}: variables= goes with a flax.linen.BatchNorm module: "
                            f"batchnorm_from_flax(module, variables).")
        flags = (("use_scale", _flag(where, "use_scale", use_scale)), ("use_bias", _flag(where, "use_bias", use_bias)))
        values, scalars = _bind_arrays(where, args, named, flags, _FLAX_CALL, renorm_weights=False)
        decay, eps = _numbers(where, scalars, momentum, epsilon)
        source = _Source(values["scale"], values["bias"], values["mean"], values["var"],
                         _float(where, "momentum", decay), _float(where, "epsilon", eps), 2 if dim is None else dim)
    return _build(where, source, _stats.from_flax(source.decay, source.eps), dtype)
