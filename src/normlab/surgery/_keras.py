"""Import a Keras ``BatchNormalization``: :func:`batchnorm_from_keras` (see :mod:`normlab.surgery.importers`)."""

from __future__ import annotations

import math
from typing import Any, Literal

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
    _is_keras_bn,
    _is_keras_layer,
    _numbers,
    _single_axis,
)

_RENORM_CHOICES = ("error", "batchnorm", "batchrenorm")
_KERAS_CALL = "batchnorm_from_keras(layer)"


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
    (0.01, 0.001, False)
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
