"""Import batch norms from Keras and Flax: :func:`batchnorm_from_keras`, :func:`batchnorm_from_flax`.

Both build a normlab batch norm from another framework's arrays: its momentum is a decay (weight
of the old value) and its moving variance is biased, so the layer gets ``momentum = 1 - decay``
and ``unbiased=False`` (:mod:`normlab.stats`); eps is the framework's. Inference then computes
exactly the source's ``(x - mean) / sqrt(var + eps) * gamma + beta``, and further training
updates the statistics as the source framework would.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .. import stats as _stats
from ..layers.batch import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["batchnorm_from_flax", "batchnorm_from_keras"]

_NORMLAB_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}


def _vector(name: str, value: Any, where: str) -> np.ndarray | None:
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{where}: {name} must be a 1-D array with one value per channel, got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"{where}: {name} has NaN or infinite values; the source layer's state is broken.")
    return array


def _from_arrays(where: str, gamma, beta, mean, var, kwargs: dict, dim: int, dtype: torch.dtype) -> nn.Module:
    if dim not in (1, 2, 3):
        raise ValueError(f"{where}: dim must be 1, 2 or 3 (BatchNorm1d/2d/3d), got {dim!r}.")
    arrays = {"gamma/scale": _vector("gamma", gamma, where), "beta/bias": _vector("beta", beta, where),
              "mean": _vector("mean", mean, where), "variance": _vector("variance", var, where)}
    if arrays["mean"] is None or arrays["variance"] is None:
        raise ValueError(f"{where}: the moving mean and variance are required, got None.")
    sizes = {k: a.size for k, a in arrays.items() if a is not None}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}: every array needs one value per channel, got sizes {sizes}.")
    if (arrays["variance"] < 0).any():
        raise ValueError(f"{where}: the moving variance has negative values ({arrays['variance'].min():g}); "
                         f"a variance is >= 0.")
    channels = arrays["mean"].size
    affine = gamma is not None or beta is not None
    bn = _NORMLAB_BN[dim](channels, affine=affine, dtype=dtype, **kwargs)
    with torch.no_grad():
        if affine:
            if arrays["gamma/scale"] is not None:
                bn.weight.copy_(torch.from_numpy(arrays["gamma/scale"]))
            if arrays["beta/bias"] is not None:
                bn.bias.copy_(torch.from_numpy(arrays["beta/bias"]))
        bn.running_mean.copy_(torch.from_numpy(arrays["mean"]))
        bn.running_var.copy_(torch.from_numpy(arrays["variance"]))
    return bn.eval()


def batchnorm_from_keras(
    gamma: Any,
    beta: Any,
    moving_mean: Any,
    moving_variance: Any,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    *,
    dim: int = 2,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A normlab batch norm (in eval mode) equal to a Keras ``BatchNormalization`` layer.

    Keras computes ``(x - moving_mean) / sqrt(moving_variance + epsilon) * gamma + beta`` at
    inference, and in training ``moving = momentum * moving + (1 - momentum) * batch`` with the
    biased batch variance. The layer gets ``momentum = 1 - momentum`` (torch's meaning),
    ``eps = epsilon`` and ``unbiased=False``, so both agree. Keras is channels-last: the arrays
    are per channel as here, but its input ``(N, H, W, C)`` must be permuted to ``(N, C, H, W)``.

    Args:
        gamma, beta: ``(C,)`` arrays, or None where the Keras layer has ``scale=False`` /
            ``center=False`` (the order of ``layer.get_weights()``: gamma, beta, mean, variance).
        moving_mean, moving_variance: ``(C,)`` arrays.
        momentum: Keras's momentum, a decay (default 0.99).
        epsilon: Keras's epsilon (default 1e-3).
        dim: 1, 2 or 3: build BatchNorm1d, 2d or 3d.
        dtype: of the parameters (statistics stay float32 for 16-bit dtypes).

    >>> import numpy as np, torch
    >>> bn = batchnorm_from_keras(np.ones(2), np.zeros(2), np.array([1.0, 2.0]), np.array([4.0, 9.0]), dim=1)
    >>> bn.momentum, bn.eps, bn.unbiased
    (0.010000000000000009, 0.001, False)
    >>> bn(torch.tensor([[3.0, 5.0]]))
    tensor([[0.9999, 0.9999]], grad_fn=<NativeBatchNormBackward0>)
    """
    return _from_arrays("batchnorm_from_keras", gamma, beta, moving_mean, moving_variance,
                        _stats.from_keras(momentum, epsilon), dim, dtype)


def batchnorm_from_flax(
    scale: Any,
    bias: Any,
    mean: Any,
    var: Any,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    *,
    dim: int = 2,
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """A normlab batch norm (in eval mode) equal to a Flax ``nn.BatchNorm`` layer.

    Flax computes ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with its ``batch_stats``
    (``mean``, ``var``) at inference, and in training ``ra = momentum * ra + (1 - momentum) * batch``
    with the biased batch variance; the layer gets ``momentum = 1 - momentum``, ``eps = epsilon``
    and ``unbiased=False``. Pass the arrays of ``variables["params"][name]`` (``scale``,
    ``bias``; None where ``use_scale``/``use_bias`` is False) and ``variables["batch_stats"][name]``
    (``mean``, ``var``), e.g. ``batchnorm_from_flax(**params["bn"], **batch_stats["bn"])``.
    Flax is channels-last, like Keras.

    >>> import numpy as np
    >>> bn = batchnorm_from_flax(np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), momentum=0.9)
    >>> type(bn).__name__, round(bn.momentum, 6), bn.eps, bn.unbiased
    ('BatchNorm2d', 0.1, 1e-05, False)
    """
    return _from_arrays("batchnorm_from_flax", scale, bias, mean, var,
                        _stats.from_flax(momentum, epsilon), dim, dtype)
