"""Import a Flax ``BatchNorm`` (linen or nnx): :func:`batchnorm_from_flax` (see :mod:`normlab.surgery.importers`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .. import stats as _stats
from ._import_common import (
    _UNSET,
    _Source,
    _agree,
    _bind_arrays,
    _build,
    _check_dim,
    _describe,
    _dim_for,
    _flag,
    _flax_kind,
    _float,
    _is_keras_layer,
    _numbers,
    _single_axis,
)

_FLAX_CALL = "batchnorm_from_flax(module, variables) for flax.linen, batchnorm_from_flax(module) for flax.nnx"


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
