"""Plain float64 NumPy reference implementations of the normalization layers.

This module is the *oracle* that the test-suite holds the torch implementation
against. It depends on NumPy only, converts every input to ``float64`` and is
written to be read: each function spells out the textbook formulas.

All of the layers below share the same two steps.

1. **Standardize** over some set of axes ("the normalized axes")::

       mu      = mean(x)                       over the normalized axes
       sigma^2 = mean((x - mu)^2)              biased variance (divisor n)
       x_hat   = (x - mu) / sqrt(sigma^2 + eps)

   The variance is computed with the stable *two-pass* algorithm: first the
   mean, then the mean of the squared deviations from it.  The one-pass form
   ``E[x^2] - E[x]^2`` is never used, because it cancels catastrophically
   when the mean is large compared with the spread (e.g. mean 1e6, std 1).

2. **Affine transform**::

       y = gamma * x_hat + beta

   ``weight=None`` means ``gamma = 1`` and ``bias=None`` means ``beta = 0``.

The layers differ only in which axes they normalize over and in the shape of
``gamma``/``beta``.  Tensors are channels-first, ``(N, C, *spatial)``:

============== ======================================= ====================
layer          statistics over                          gamma / beta shape
============== ======================================= ====================
batch norm     N and all spatial axes (per channel)     (C,)
layer norm     the last ``len(normalized_shape)`` axes  normalized_shape
group norm     channels of one group + spatial axes     (C,)
               (per sample, per group)
instance norm  spatial axes (per sample, per channel)   (C,)
RMS norm       last axes, *no* mean subtraction         normalized_shape
============== ======================================= ====================

The semantics follow ``torch.nn.functional`` / ``torch.nn`` exactly, including
torch's conventions for running statistics (``momentum`` is the weight of the
*new* batch, and the running variance is updated with the *unbiased* batch
variance).

Every ``*_backward`` function returns the gradients of the scalar
``L = sum(dy * y)`` with respect to the input and the affine parameters, i.e.
the vector-Jacobian product with the upstream gradient ``dy``.  The gradients
with respect to ``weight``/``bias`` are returned even when ``weight`` or
``bias`` is ``None`` (they are then the gradients at ``gamma = 1``,
``beta = 0``).

All functions are pure: they never modify their arguments and always return
new arrays.

This file is longer than the project's 600 lines per module on purpose: it is
the one oracle, every formula written once and read side by side with the
others (the shared standardize step above, each norm's forward next to its
analytic backward), and it mirrors :mod:`normlab.functional` name for name.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "batch_norm",
    "update_running_stats",
    "batch_norm_backward",
    "layer_norm",
    "layer_norm_backward",
    "group_norm",
    "group_norm_backward",
    "instance_norm",
    "instance_norm_backward",
    "rms_norm",
    "rms_norm_backward",
    "masked_batch_norm",
    "masked_batch_norm_backward",
    "batch_norm_act",
    "batch_norm_act_backward",
    "batch_renorm",
    "batch_renorm_backward",
    "ghost_batch_sizes",
    "ghost_batch_norm",
    "ghost_batch_norm_backward",
    "channel_mean_var",
    "batch_norm_with_stats",
    "apply_batch_stats",
]

ShapeLike = int | Sequence[int]


# ---------------------------------------------------------------------------
# Small private helpers
# ---------------------------------------------------------------------------


def _as_float64(a: ArrayLike) -> np.ndarray:
    """Return ``a`` as a float64 ndarray (no copy if it already is one)."""
    return np.asarray(a, dtype=np.float64)


def _as_shape(normalized_shape: ShapeLike) -> tuple[int, ...]:
    """Turn an int or a sequence of ints into a shape tuple."""
    if isinstance(normalized_shape, (int, np.integer)):
        return (int(normalized_shape),)
    return tuple(int(d) for d in normalized_shape)


def _check_channels_first(x: np.ndarray, min_ndim: int, name: str) -> None:
    if x.ndim < min_ndim:
        raise ValueError(
            f"{name}: expected an input with at least {min_ndim} dimensions "
            f"(N, C{', L, ...' if min_ndim > 2 else ', *'}), got shape {x.shape}"
        )


def _all_axes_but_channel(ndim: int) -> tuple[int, ...]:
    """Axes (0, 2, 3, ..., ndim - 1): everything except the channel axis 1."""
    return (0,) + tuple(range(2, ndim))


def _spatial_axes(ndim: int) -> tuple[int, ...]:
    """Axes (2, 3, ..., ndim - 1) of a channels-first tensor."""
    return tuple(range(2, ndim))


def _last_axes(ndim: int, count: int) -> tuple[int, ...]:
    """The last ``count`` axes of an ``ndim``-dimensional array."""
    return tuple(range(ndim - count, ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a per-channel vector of shape (C,) to (1, C, 1, ..., 1).

    The result broadcasts against a channels-first tensor with ``ndim`` axes.
    """
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _channel_param(
    p: ArrayLike | None, num_channels: int, fill: float, name: str
) -> np.ndarray:
    """A per-channel parameter of shape (C,); ``None`` becomes ``fill``."""
    if p is None:
        return np.full(num_channels, fill, dtype=np.float64)
    p = _as_float64(p)
    if p.shape != (num_channels,):
        raise ValueError(f"{name} must have shape ({num_channels},), got {p.shape}")
    return p


def _elementwise_param(
    p: ArrayLike | None, shape: tuple[int, ...], fill: float, name: str
) -> np.ndarray:
    """An elementwise parameter of shape ``shape``; ``None`` becomes ``fill``."""
    if p is None:
        return np.full(shape, fill, dtype=np.float64)
    p = _as_float64(p)
    if p.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {p.shape}")
    return p


def _check_trailing_shape(x: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if len(shape) == 0 or x.ndim < len(shape) or x.shape[x.ndim - len(shape):] != shape:
        raise ValueError(
            f"{name}: normalized_shape {shape} does not match the trailing "
            f"dimensions of the input of shape {x.shape}"
        )


def _standardize(
    x: np.ndarray, axes: tuple[int, ...], eps: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardize ``x`` over ``axes``; return ``(x_hat, mean, var)``.

    mean  = mean(x)                 over ``axes``
    var   = mean((x - mean)^2)      over ``axes`` (biased, two-pass)
    x_hat = (x - mean) / sqrt(var + eps)

    ``mean`` and ``var`` keep the reduced axes with size 1, so they broadcast
    against ``x``.  With ``eps > 0`` the denominator is never zero, so a
    constant slice gives ``x_hat = 0`` (never 0/0).
    """
    mean = np.mean(x, axis=axes, keepdims=True)
    deviation = x - mean
    var = np.mean(deviation * deviation, axis=axes, keepdims=True)
    x_hat = deviation / np.sqrt(var + eps)
    return x_hat, mean, var


def _standardize_backward(
    dx_hat: np.ndarray, x_hat: np.ndarray, var: np.ndarray, axes: tuple[int, ...], eps: float
) -> np.ndarray:
    """Gradient through ``x_hat = (x - mean) / sqrt(var + eps)``.

    ``dx_hat`` is dL/dx_hat (for the affine layers this is ``dy * gamma``).
    Because the mean and the variance depend on every element of the slice,
    the gradient is, with sigma = sqrt(var + eps) and the means over ``axes``:

        dx = (1 / sigma) * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))
    """
    sigma = np.sqrt(var + eps)
    mean_dx_hat = np.mean(dx_hat, axis=axes, keepdims=True)
    mean_dx_hat_x_hat = np.mean(dx_hat * x_hat, axis=axes, keepdims=True)
    return (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat) / sigma


# ---------------------------------------------------------------------------
# Batch normalization
# ---------------------------------------------------------------------------


def update_running_stats(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    n: int,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One update of the running mean and variance, in torch's convention.

    Formula, with ``m`` the weight of the new batch::

        m                 = momentum                          if momentum is not None
                          = 1 / (num_batches_tracked + 1)     if momentum is None
                                                              (cumulative average)
        v                 = batch_var * n / (n - 1)           if unbiased
                          = batch_var                         otherwise
        new_running_mean  = (1 - m) * running_mean + m * batch_mean
        new_running_var   = (1 - m) * running_var  + m * v

    Args:
        running_mean, running_var: current running statistics, shape (C,).
        batch_mean: mean of the current batch, shape (C,).
        batch_var: the *biased* variance of the current batch (divisor ``n``),
            shape (C,).
        n: number of values each per-channel statistic was computed from
            (``N * prod(spatial)`` for batch norm).
        momentum: weight of the new batch (default 0.1), or ``None`` for a
            cumulative moving average.
        num_batches_tracked: number of batches seen *before* this one; only
            used when ``momentum is None``. Default 0.
        unbiased: apply Bessel's correction ``n / (n - 1)`` to the variance
            that enters the running average (torch does). Default True.

    Returns:
        ``(new_running_mean, new_running_var)``, new arrays of shape (C,).

    Raises:
        ValueError: if ``unbiased`` and ``n < 2`` (the correction divides by
            ``n - 1``), or if ``n < 1``.
    """
    running_mean = _as_float64(running_mean)
    running_var = _as_float64(running_var)
    batch_mean = _as_float64(batch_mean)
    batch_var = _as_float64(batch_var)
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")

    if unbiased:
        if n < 2:
            raise ValueError(
                f"unbiased running variance needs n >= 2 values per channel, got n={n}"
            )
        variance_for_running = batch_var * n / (n - 1)
    else:
        variance_for_running = batch_var

    if momentum is None:
        factor = 1.0 / (num_batches_tracked + 1)
    else:
        factor = float(momentum)

    new_running_mean = (1.0 - factor) * running_mean + factor * batch_mean
    new_running_var = (1.0 - factor) * running_var + factor * variance_for_running
    return new_running_mean, new_running_var


def batch_norm(
    x: ArrayLike,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """Batch normalization (as ``torch.nn.BatchNorm1d/2d/3d``).

    Formula, per channel c, with the statistics over the batch axis and all
    spatial axes (every axis except axis 1)::

        mu_B      = mean(x[:, c, ...])
        sigma^2_B = mean((x[:, c, ...] - mu_B)^2)              (biased, divisor n)
        x_hat     = (x - mu_B) / sqrt(sigma^2_B + eps)
        y         = gamma[c] * x_hat + beta[c]

    where ``n = N * prod(spatial)``.

    Which statistics are used:

    * ``training=True``, or no running statistics given: the batch statistics
      ``mu_B`` and ``sigma^2_B`` above (this is what a module with
      ``track_running_stats=False`` does in both modes).
    * ``training=False`` with running statistics: ``running_mean`` and
      ``running_var`` take the place of ``mu_B`` and ``sigma^2_B``.

    The running statistics are updated only when ``training=True`` and they
    are given: see :func:`update_running_stats` (called with ``mu_B``,
    ``sigma^2_B`` and ``n``), and the count becomes
    ``num_batches_tracked + 1``.  Otherwise they are returned unchanged (as
    copies; ``None`` stays ``None``).

    Args:
        x: input of shape (N, C) or (N, C, *spatial).
        running_mean, running_var: running statistics of shape (C,), or both
            ``None``. Default None.
        weight: gamma, shape (C,); ``None`` means 1. Default None.
        bias: beta, shape (C,); ``None`` means 0. Default None.
        training: use batch statistics and update the running ones.
            Default False.
        momentum: weight of the new batch in the running average (default
            0.1); ``None`` means cumulative average.
        eps: added to the variance for numerical stability. Default 1e-5.
        num_batches_tracked: batches seen before this one. Default 0.
        unbiased: update the running variance with the unbiased batch
            variance ``sigma^2_B * n / (n - 1)`` (torch does). Default True.

    Returns:
        ``(y, new_running_mean, new_running_var, new_num_batches_tracked)``;
        ``y`` has the shape of ``x``.

    Raises:
        ValueError: if ``x`` has fewer than 2 axes, if only one of the running
            statistics is given, or if batch statistics are used and there
            is only one value per channel (``n == 1``; torch raises
            "Expected more than 1 value per channel when training").
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="batch_norm")
    num_channels = x.shape[1]
    axes = _all_axes_but_channel(x.ndim)
    n = x.size // num_channels if num_channels > 0 else 0

    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    has_running_stats = running_mean is not None
    if has_running_stats:
        running_mean = _channel_param(running_mean, num_channels, 0.0, "running_mean")
        running_var = _channel_param(running_var, num_channels, 1.0, "running_var")

    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    beta = _per_channel(_channel_param(bias, num_channels, 0.0, "bias"), x.ndim)

    use_batch_stats = training or not has_running_stats
    if use_batch_stats and n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input shape {x.shape}"
        )

    if use_batch_stats:
        x_hat, batch_mean, batch_var = _standardize(x, axes, eps)
    else:
        mean = _per_channel(running_mean, x.ndim)
        var = _per_channel(running_var, x.ndim)
        x_hat = (x - mean) / np.sqrt(var + eps)

    y = gamma * x_hat + beta

    if training and has_running_stats:
        new_running_mean, new_running_var = update_running_stats(
            running_mean,
            running_var,
            batch_mean.reshape(num_channels),
            batch_var.reshape(num_channels),
            n,
            momentum=momentum,
            num_batches_tracked=num_batches_tracked,
            unbiased=unbiased,
        )
        new_num_batches_tracked = int(num_batches_tracked) + 1
    else:
        new_running_mean = None if running_mean is None else running_mean.copy()
        new_running_var = None if running_var is None else running_var.copy()
        new_num_batches_tracked = int(num_batches_tracked)

    return y, new_running_mean, new_running_var, new_num_batches_tracked


def batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
    training: bool = True,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`batch_norm`.

    With the sums and means over every axis except the channel axis 1:

    * Training mode (``training=True``, or no running statistics): the batch
      statistics depend on x, so with sigma = sqrt(sigma^2_B + eps)::

          dx = (gamma / sigma) * (dy - mean(dy) - x_hat * mean(dy * x_hat))

    * Eval mode (``training=False`` with running statistics): the statistics
      are constants, so::

          x_hat = (x - running_mean) / sqrt(running_var + eps)
          dx    = dy * gamma / sqrt(running_var + eps)

    In both modes::

        dweight = sum(dy * x_hat)
        dbias   = sum(dy)

    Args:
        dy: upstream gradient, same shape as ``x``.
        x: input of shape (N, C) or (N, C, *spatial).
        weight: gamma, shape (C,); ``None`` means 1. Default None.
        eps: as in the forward pass. Default 1e-5.
        training: as in the forward pass. Default True.
        running_mean, running_var: shape (C,), or both ``None``. Default None.

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    _check_channels_first(x, min_ndim=2, name="batch_norm_backward")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    num_channels = x.shape[1]
    axes = _all_axes_but_channel(x.ndim)
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)

    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    use_batch_stats = training or running_mean is None

    if use_batch_stats:
        x_hat, _, batch_var = _standardize(x, axes, eps)
        dx = _standardize_backward(dy * gamma, x_hat, batch_var, axes, eps)
    else:
        mean = _per_channel(_channel_param(running_mean, num_channels, 0.0, "running_mean"), x.ndim)
        var = _per_channel(_channel_param(running_var, num_channels, 1.0, "running_var"), x.ndim)
        x_hat = (x - mean) / np.sqrt(var + eps)
        dx = dy * gamma / np.sqrt(var + eps)

    dweight = np.sum(dy * x_hat, axis=axes)
    dbias = np.sum(dy, axis=axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# Layer normalization
# ---------------------------------------------------------------------------


def layer_norm(
    x: ArrayLike,
    normalized_shape: ShapeLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Layer normalization (as ``torch.nn.functional.layer_norm``).

    With the statistics over the last ``k = len(normalized_shape)`` axes,
    separately for every index of the leading axes::

        mu      = mean(x)                over the last k axes
        sigma^2 = mean((x - mu)^2)       over the last k axes (biased)
        x_hat   = (x - mu) / sqrt(sigma^2 + eps)
        y       = gamma * x_hat + beta   (elementwise, gamma/beta of shape
                                          normalized_shape)

    Args:
        x: input whose trailing dimensions equal ``normalized_shape``.
        normalized_shape: an int ``D`` (same as ``(D,)``) or a tuple.
        weight: gamma of shape ``normalized_shape``; ``None`` means 1.
        bias: beta of shape ``normalized_shape``; ``None`` means 0.
        eps: added to the variance. Default 1e-5.

    Returns:
        ``y``, same shape as ``x``.
    """
    x = _as_float64(x)
    shape = _as_shape(normalized_shape)
    _check_trailing_shape(x, shape, "layer_norm")
    axes = _last_axes(x.ndim, len(shape))
    gamma = _elementwise_param(weight, shape, 1.0, "weight")
    beta = _elementwise_param(bias, shape, 0.0, "bias")

    x_hat, _, _ = _standardize(x, axes, eps)
    return gamma * x_hat + beta


def layer_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    normalized_shape: ShapeLike,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`layer_norm`.

    With the means over the last ``k`` (normalized) axes and
    sigma = sqrt(sigma^2 + eps); gamma varies along the normalized axes, so it
    goes inside the means::

        g       = dy * gamma
        dx      = (1 / sigma) * (g - mean(g) - x_hat * mean(g * x_hat))
        dweight = sum(dy * x_hat)      over the leading axes
        dbias   = sum(dy)              over the leading axes

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, ``normalized_shape``,
        ``normalized_shape``.
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    shape = _as_shape(normalized_shape)
    _check_trailing_shape(x, shape, "layer_norm_backward")
    axes = _last_axes(x.ndim, len(shape))
    leading_axes = tuple(range(x.ndim - len(shape)))
    gamma = _elementwise_param(weight, shape, 1.0, "weight")

    x_hat, _, var = _standardize(x, axes, eps)
    dx = _standardize_backward(dy * gamma, x_hat, var, axes, eps)
    dweight = np.sum(dy * x_hat, axis=leading_axes)
    dbias = np.sum(dy, axis=leading_axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# Group normalization
# ---------------------------------------------------------------------------


def _to_groups(a: np.ndarray, num_groups: int) -> np.ndarray:
    """Reshape (N, C, *spatial) to (N, G, C // G, *spatial)."""
    n, c = a.shape[0], a.shape[1]
    return a.reshape((n, num_groups, c // num_groups) + a.shape[2:])


def _check_groups(num_channels: int, num_groups: int) -> None:
    if num_groups < 1:
        raise ValueError(f"num_groups must be positive, got {num_groups}")
    if num_channels % num_groups != 0:
        raise ValueError(
            f"the number of channels ({num_channels}) must be divisible by "
            f"num_groups ({num_groups})"
        )


def group_norm(
    x: ArrayLike,
    num_groups: int,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
) -> np.ndarray:
    """Group normalization (as ``torch.nn.functional.group_norm``).

    The C channels are split into ``G = num_groups`` contiguous groups of
    ``C // G`` channels.  For every sample n and group g, the statistics are
    over the group's channels and all spatial positions::

        mu_ng      = mean(x[n, channels of g, ...])
        sigma^2_ng = mean((x[n, channels of g, ...] - mu_ng)^2)      (biased)
        x_hat      = (x - mu_ng) / sqrt(sigma^2_ng + eps)
        y[:, c]    = gamma[c] * x_hat[:, c] + beta[c]                (per channel)

    Args:
        x: input of shape (N, C) or (N, C, *spatial).
        num_groups: G, must divide C.
        weight: gamma of shape (C,); ``None`` means 1.
        bias: beta of shape (C,); ``None`` means 0.
        eps: added to the variance. Default 1e-5.

    Returns:
        ``y``, same shape as ``x``.

    Raises:
        ValueError: if C is not divisible by ``num_groups``.
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="group_norm")
    num_channels = x.shape[1]
    _check_groups(num_channels, num_groups)
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    beta = _per_channel(_channel_param(bias, num_channels, 0.0, "bias"), x.ndim)

    # In the grouped view (N, G, C // G, *spatial) a group is axes 2, 3, ...
    x_grouped = _to_groups(x, num_groups)
    group_axes = tuple(range(2, x_grouped.ndim))
    x_hat_grouped, _, _ = _standardize(x_grouped, group_axes, eps)
    x_hat = x_hat_grouped.reshape(x.shape)

    return gamma * x_hat + beta


def group_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    num_groups: int,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`group_norm`.

    With the means over one (sample, group) slice and
    sigma = sqrt(sigma^2_ng + eps); gamma varies across the channels of a
    group, so it goes inside the means::

        g       = dy * gamma
        dx      = (1 / sigma) * (g - mean(g) - x_hat * mean(g * x_hat))
        dweight = sum(dy * x_hat)     over all axes but 1
        dbias   = sum(dy)             over all axes but 1

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    _check_channels_first(x, min_ndim=2, name="group_norm_backward")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    num_channels = x.shape[1]
    _check_groups(num_channels, num_groups)
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)

    x_grouped = _to_groups(x, num_groups)
    group_axes = tuple(range(2, x_grouped.ndim))
    x_hat_grouped, _, var = _standardize(x_grouped, group_axes, eps)
    g_grouped = _to_groups(dy * gamma, num_groups)
    dx = _standardize_backward(g_grouped, x_hat_grouped, var, group_axes, eps).reshape(x.shape)

    x_hat = x_hat_grouped.reshape(x.shape)
    channel_axes = _all_axes_but_channel(x.ndim)
    dweight = np.sum(dy * x_hat, axis=channel_axes)
    dbias = np.sum(dy, axis=channel_axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# Instance normalization
# ---------------------------------------------------------------------------


def instance_norm(
    x: ArrayLike,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    use_input_stats: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Instance normalization (as ``torch.nn.functional.instance_norm``).

    For every sample n and channel c, the statistics are over the spatial
    axes, which hold ``L = prod(spatial)`` positions::

        mu_nc      = mean(x[n, c, ...])
        sigma^2_nc = mean((x[n, c, ...] - mu_nc)^2)                 (biased)
        x_hat      = (x - mu_nc) / sqrt(sigma^2_nc + eps)
        y[:, c]    = gamma[c] * x_hat[:, c] + beta[c]

    Instance norm is group norm with one channel per group (G = C).

    Which statistics are used:

    * ``use_input_stats=True``: the per-instance statistics above.  If
      running statistics are given they are updated, as torch does, with the
      per-instance statistics averaged over the batch (m = momentum)::

          new_running_mean = (1 - m) * running_mean + m * mean_n(mu_nc)
          new_running_var  = (1 - m) * running_var
                             + m * mean_n(sigma^2_nc * L / (L - 1))

    * ``use_input_stats=False``: every instance is normalized with
      ``running_mean``/``running_var`` (which must be given) in place of
      ``mu_nc``/``sigma^2_nc``; they are returned unchanged.

    Args:
        x: input of shape (N, C, L, ...) with at least one spatial axis.
        running_mean, running_var: shape (C,), or both ``None``.
        weight: gamma of shape (C,); ``None`` means 1.
        bias: beta of shape (C,); ``None`` means 0.
        use_input_stats: see above. Default True.
        momentum: weight of the new batch in the running average. Default
            0.1. ``None`` (cumulative average) is not supported, as in torch.
        eps: added to the variance. Default 1e-5.

    Returns:
        ``(y, new_running_mean, new_running_var)``; the running statistics are
        new arrays, or ``None`` if none were given.

    Raises:
        ValueError: if ``momentum`` is None; if ``x`` has no spatial axis; if
            ``use_input_stats`` and there is only one spatial position (torch:
            "Expected more than 1 spatial element when training"); if
            ``use_input_stats=False`` without running statistics.
    """
    if momentum is None:
        raise ValueError(
            "instance_norm does not support momentum=None (cumulative average); "
            "torch's instance norm takes a float momentum"
        )
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=3, name="instance_norm")
    num_channels = x.shape[1]
    spatial_axes = _spatial_axes(x.ndim)
    num_positions = int(np.prod(x.shape[2:]))

    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    has_running_stats = running_mean is not None
    if has_running_stats:
        running_mean = _channel_param(running_mean, num_channels, 0.0, "running_mean")
        running_var = _channel_param(running_var, num_channels, 1.0, "running_var")

    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    beta = _per_channel(_channel_param(bias, num_channels, 0.0, "bias"), x.ndim)

    if use_input_stats:
        if num_positions <= 1:
            raise ValueError(
                "Expected more than 1 spatial element when training, "
                f"got input shape {x.shape}"
            )
        x_hat, instance_mean, instance_var = _standardize(x, spatial_axes, eps)
    else:
        if not has_running_stats:
            raise ValueError("use_input_stats=False requires running_mean and running_var")
        mean = _per_channel(running_mean, x.ndim)
        var = _per_channel(running_var, x.ndim)
        x_hat = (x - mean) / np.sqrt(var + eps)

    y = gamma * x_hat + beta

    if use_input_stats and has_running_stats:
        # instance_mean / instance_var have shape (N, C, 1, ..., 1).
        mu_nc = instance_mean.reshape(x.shape[0], num_channels)
        unbiased_var_nc = instance_var.reshape(x.shape[0], num_channels) * (
            num_positions / (num_positions - 1)
        )
        new_running_mean = (1.0 - momentum) * running_mean + momentum * np.mean(mu_nc, axis=0)
        new_running_var = (1.0 - momentum) * running_var + momentum * np.mean(
            unbiased_var_nc, axis=0
        )
    else:
        new_running_mean = None if running_mean is None else running_mean.copy()
        new_running_var = None if running_var is None else running_var.copy()

    return y, new_running_mean, new_running_var


def instance_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`instance_norm` with
    ``use_input_stats=True``.

    With the means over the spatial axes of one (sample, channel) slice and
    sigma = sqrt(sigma^2_nc + eps)::

        dx      = (gamma / sigma) * (dy - mean(dy) - x_hat * mean(dy * x_hat))
        dweight = sum(dy * x_hat)     over all axes but 1
        dbias   = sum(dy)             over all axes but 1

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    _check_channels_first(x, min_ndim=3, name="instance_norm_backward")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    num_channels = x.shape[1]
    spatial_axes = _spatial_axes(x.ndim)
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)

    x_hat, _, var = _standardize(x, spatial_axes, eps)
    dx = _standardize_backward(dy * gamma, x_hat, var, spatial_axes, eps)

    channel_axes = _all_axes_but_channel(x.ndim)
    dweight = np.sum(dy * x_hat, axis=channel_axes)
    dbias = np.sum(dy, axis=channel_axes)
    return dx, dweight, dbias


# ---------------------------------------------------------------------------
# RMS normalization
# ---------------------------------------------------------------------------


def _rms_eps(eps: float | None) -> float:
    """``eps=None`` means float32 machine epsilon (what torch uses for float32)."""
    if eps is None:
        return float(np.finfo(np.float32).eps)
    return float(eps)


def rms_norm(
    x: ArrayLike,
    normalized_shape: ShapeLike,
    weight: ArrayLike | None = None,
    eps: float | None = None,
) -> np.ndarray:
    """Root-mean-square normalization (as ``torch.nn.functional.rms_norm``).

    With the mean over the last ``k = len(normalized_shape)`` axes (the mean
    is *not* subtracted, and there is no bias)::

        rms = sqrt(mean(x^2) + eps)
        y   = x / rms * gamma        (elementwise, gamma of shape normalized_shape)

    Args:
        x: input whose trailing dimensions equal ``normalized_shape``.
        normalized_shape: an int ``D`` (same as ``(D,)``) or a tuple.
        weight: gamma of shape ``normalized_shape``; ``None`` means 1.
        eps: added to the mean square.  ``None`` (default) means float32
            machine epsilon, ``np.finfo(np.float32).eps`` ~ 1.19e-7.  torch
            uses ``finfo(input.dtype).eps``, so this default matches torch for
            float32 input; for float64 input pass ``eps`` explicitly.

    Returns:
        ``y``, same shape as ``x``.
    """
    x = _as_float64(x)
    shape = _as_shape(normalized_shape)
    _check_trailing_shape(x, shape, "rms_norm")
    axes = _last_axes(x.ndim, len(shape))
    gamma = _elementwise_param(weight, shape, 1.0, "weight")

    rms = np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + _rms_eps(eps))
    return x / rms * gamma


def rms_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    normalized_shape: ShapeLike,
    weight: ArrayLike | None = None,
    eps: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`rms_norm`.

    With ``r = 1 / sqrt(mean(x^2) + eps)`` and the means over the last ``k``
    axes (``d r / d x_j = -r^3 x_j / D`` with D the number of normalized
    elements)::

        g       = dy * gamma
        dx      = r * (g - x * r^2 * mean(g * x))
        dweight = sum(dy * x * r)      over the leading axes

    ``eps=None`` means float32 machine epsilon, as in :func:`rms_norm`.

    Returns:
        ``(dx, dweight)`` with shapes ``x.shape`` and ``normalized_shape``.
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    shape = _as_shape(normalized_shape)
    _check_trailing_shape(x, shape, "rms_norm_backward")
    axes = _last_axes(x.ndim, len(shape))
    leading_axes = tuple(range(x.ndim - len(shape)))
    gamma = _elementwise_param(weight, shape, 1.0, "weight")

    r = 1.0 / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + _rms_eps(eps))
    g = dy * gamma
    dx = r * (g - x * r * r * np.mean(g * x, axis=axes, keepdims=True))
    dweight = np.sum(dy * x * r, axis=leading_axes)
    return dx, dweight


# ---------------------------------------------------------------------------
# Masked batch normalization (padded sequences, point sets)
# ---------------------------------------------------------------------------


def _broadcast_mask(x: np.ndarray, mask: ArrayLike, name: str) -> np.ndarray:
    """The bool mask broadcast to ``x``'s shape without the channel axis, then given a
    channel axis of size 1: shape (N, 1, *spatial)."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"{name}: mask must be boolean (True = valid), got dtype {mask.dtype}")
    target = (x.shape[0],) + x.shape[2:]
    if mask.ndim != len(target):
        raise ValueError(f"{name}: mask must have shape {target} (size-1 axes broadcast), got {mask.shape}")
    return np.broadcast_to(mask, target)[:, None]


def masked_batch_norm(
    x: ArrayLike,
    mask: ArrayLike,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """Batch normalization over the valid positions of a padded batch.

    ``mask`` is boolean, True at valid positions, with the shape of ``x`` without
    the channel axis (size-1 axes broadcast): (N,) for (N, C), (N, L) for
    (N, C, L). With ``m`` the mask broadcast over the channels, per channel c::

        K         = sum(m)                                   valid positions
        mu_B      = sum(m * x[:, c]) / K
        sigma^2_B = sum(m * (x[:, c] - mu_B)^2) / K          (biased, two-pass)
        x_hat     = (x - mu_B) / sqrt(sigma^2_B + eps)
        y         = gamma[c] * x_hat + beta[c]   where m,    0 where not

    This is :func:`batch_norm` of the concatenation of the valid parts, put
    back in place with zeros in the padding.  Padded values never enter (they
    may be NaN).  Eval mode (running statistics given, ``training=False``)
    uses them in place of ``mu_B`` and ``sigma^2_B``.  The running statistics
    are updated as in :func:`batch_norm` with ``n = K``.

    Returns:
        ``(y, new_running_mean, new_running_var, new_num_batches_tracked)``.

    Raises:
        ValueError: batch statistics with fewer than 2 valid positions.
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="masked_batch_norm")
    m = _broadcast_mask(x, mask, "masked_batch_norm")
    num_channels = x.shape[1]
    axes = _all_axes_but_channel(x.ndim)
    count = int(m.sum())  # valid positions per channel

    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    has_running_stats = running_mean is not None
    if has_running_stats:
        running_mean = _channel_param(running_mean, num_channels, 0.0, "running_mean")
        running_var = _channel_param(running_var, num_channels, 1.0, "running_var")
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    beta = _per_channel(_channel_param(bias, num_channels, 0.0, "bias"), x.ndim)

    use_batch_stats = training or not has_running_stats
    if use_batch_stats and count < 2:
        raise ValueError(f"masked batch norm needs at least 2 valid positions per channel, got {count}")

    x = np.where(m, x, 0.0)
    if use_batch_stats:
        mean = np.sum(x, axis=axes, keepdims=True) / count
        deviation = np.where(m, x - mean, 0.0)
        var = np.sum(deviation * deviation, axis=axes, keepdims=True) / count
    else:
        mean = _per_channel(running_mean, x.ndim)
        var = _per_channel(running_var, x.ndim)
    y = np.where(m, gamma * (x - mean) / np.sqrt(var + eps) + beta, 0.0)

    if training and has_running_stats:
        new_running_mean, new_running_var = update_running_stats(
            running_mean, running_var, mean.reshape(num_channels), var.reshape(num_channels),
            count, momentum=momentum, num_batches_tracked=num_batches_tracked, unbiased=unbiased,
        )
        return y, new_running_mean, new_running_var, int(num_batches_tracked) + 1
    new_running_mean = None if running_mean is None else running_mean.copy()
    new_running_var = None if running_var is None else running_var.copy()
    return y, new_running_mean, new_running_var, int(num_batches_tracked)


def masked_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    mask: ArrayLike,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
    training: bool = True,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`masked_batch_norm`.

    Only valid positions reach ``y``, so with ``g = m * dy``, the sums over the
    valid positions and ``K`` their number, in training::

        dx      = m * (gamma / sigma) * (g - sum(g) / K - x_hat * sum(g * x_hat) / K)

    and with running statistics (eval) ``dx = m * g * gamma / sqrt(running_var + eps)``;
    in both ``dweight = sum(g * x_hat)``, ``dbias = sum(g)``.  Padded
    positions get ``dx = 0``.

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    m = _broadcast_mask(x, mask, "masked_batch_norm_backward")
    num_channels = x.shape[1]
    axes = _all_axes_but_channel(x.ndim)
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    count = int(m.sum())
    x = np.where(m, x, 0.0)
    g = np.where(m, dy, 0.0)

    if training or running_mean is None:
        mean = np.sum(x, axis=axes, keepdims=True) / count
        deviation = np.where(m, x - mean, 0.0)
        sigma = np.sqrt(np.sum(deviation * deviation, axis=axes, keepdims=True) / count + eps)
        x_hat = deviation / sigma
        sum_g = np.sum(g, axis=axes, keepdims=True)
        sum_g_x_hat = np.sum(g * x_hat, axis=axes, keepdims=True)
        dx = np.where(m, gamma / sigma * (g - sum_g / count - x_hat * sum_g_x_hat / count), 0.0)
    else:
        mean = _per_channel(_channel_param(running_mean, num_channels, 0.0, "running_mean"), x.ndim)
        sigma = np.sqrt(_per_channel(_channel_param(running_var, num_channels, 1.0, "running_var"), x.ndim) + eps)
        x_hat = np.where(m, (x - mean) / sigma, 0.0)
        dx = g * gamma / sigma
    return dx, np.sum(g * x_hat, axis=axes), np.sum(g, axis=axes)


# ---------------------------------------------------------------------------
# Batch renormalization (Ioffe 2017) and ghost batch normalization (Hoffer et al. 2017)
# ---------------------------------------------------------------------------


def _renorm_factors(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    r_max: float,
    d_max: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_hat, batch_var, r, d)`` of batch renormalization, r and d shaped to broadcast."""
    if not r_max >= 1.0:
        raise ValueError(f"batch_renorm: r_max must be >= 1, got {r_max}")
    if not d_max >= 0.0:
        raise ValueError(f"batch_renorm: d_max must be >= 0, got {d_max}")
    axes = _all_axes_but_channel(x.ndim)
    x_hat, batch_mean, batch_var = _standardize(x, axes, eps)
    sigma_batch = np.sqrt(batch_var + eps)
    sigma = np.sqrt(_per_channel(running_var, x.ndim) + eps)
    r = np.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
    d = np.clip((batch_mean - _per_channel(running_mean, x.ndim)) / sigma, -d_max, d_max)
    return x_hat, batch_var, r, d


def batch_renorm(
    x: ArrayLike,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """Batch renormalization (Ioffe 2017, "Batch Renormalization").

    In training, per channel c, with the batch statistics over every axis but 1 and the
    running statistics *before* this batch's update::

        mu_B    = mean(x[:, c, ...]),   sigma_B = sqrt(mean((x - mu_B)^2) + eps)
        sigma   = sqrt(running_var + eps)
        r       = clip(sigma_B / sigma, 1 / r_max, r_max)
        d       = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        x_hat   = (x - mu_B) / sigma_B
        y       = gamma * (x_hat * r + d) + beta

    r and d are constants for backpropagation (:func:`batch_renorm_backward`). The running
    statistics are then updated exactly as by :func:`batch_norm` (torch's momentum, unbiased
    variance, count + 1). ``r_max = 1, d_max = 0`` gives r = 1, d = 0: batch norm.

    In eval mode (``training=False``), or without running statistics (then r = 1, d = 0),
    this is :func:`batch_norm`.

    Returns:
        ``(y, new_running_mean, new_running_var, new_num_batches_tracked)`` as :func:`batch_norm`.
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="batch_renorm")
    if not training or running_mean is None or running_var is None:
        return batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked, unbiased)
    num_channels = x.shape[1]
    n = x.size // num_channels if num_channels > 0 else 0
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input shape {x.shape}"
        )
    running_mean = _channel_param(running_mean, num_channels, 0.0, "running_mean")
    running_var = _channel_param(running_var, num_channels, 1.0, "running_var")
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    beta = _per_channel(_channel_param(bias, num_channels, 0.0, "bias"), x.ndim)
    x_hat, batch_var, r, d = _renorm_factors(x, running_mean, running_var, eps, r_max, d_max)
    y = gamma * (x_hat * r + d) + beta
    axes = _all_axes_but_channel(x.ndim)
    new_mean, new_var = update_running_stats(
        running_mean, running_var, np.mean(x, axis=axes), batch_var.reshape(num_channels), n,
        momentum=momentum, num_batches_tracked=num_batches_tracked, unbiased=unbiased,
    )
    return y, new_mean, new_var, int(num_batches_tracked) + 1


def batch_renorm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    running_mean: ArrayLike | None,
    running_var: ArrayLike | None,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
    r_max: float = 3.0,
    d_max: float = 5.0,
    training: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`batch_renorm`, r and d held constant.

    In training with running statistics, with the sums and means over every axis but 1::

        dx      = (gamma * r / sigma_B) * (dy - mean(dy) - x_hat * mean(dy * x_hat))
        dweight = sum(dy * (x_hat * r + d))
        dbias   = sum(dy)

    (the batch-norm gradient of :func:`batch_norm_backward` with ``gamma * r`` in place of
    ``gamma``). Otherwise :func:`batch_norm_backward`.

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    if not training or running_mean is None or running_var is None:
        return batch_norm_backward(dy, x, weight, eps, training, running_mean, running_var)
    _check_channels_first(x, min_ndim=2, name="batch_renorm_backward")
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    num_channels = x.shape[1]
    axes = _all_axes_but_channel(x.ndim)
    running_mean = _channel_param(running_mean, num_channels, 0.0, "running_mean")
    running_var = _channel_param(running_var, num_channels, 1.0, "running_var")
    gamma = _per_channel(_channel_param(weight, num_channels, 1.0, "weight"), x.ndim)
    x_hat, batch_var, r, d = _renorm_factors(x, running_mean, running_var, eps, r_max, d_max)
    dx = _standardize_backward(dy * gamma * r, x_hat, batch_var, axes, eps)
    dweight = np.sum(dy * (x_hat * r + d), axis=axes)
    dbias = np.sum(dy, axis=axes)
    return dx, dweight, dbias


def ghost_batch_sizes(n: int, virtual_batch_size: int) -> list[int]:
    """The sizes of the virtual batches that :func:`ghost_batch_norm` cuts a batch of ``n`` into.

    Consecutive samples, ``virtual_batch_size`` each; the last one holds the rest and may be
    smaller, except that a rest of a single sample joins the virtual batch before it (one
    sample is no batch). A batch of at most ``virtual_batch_size`` samples is one virtual batch.

    >>> ghost_batch_sizes(10, 4), ghost_batch_sizes(9, 4), ghost_batch_sizes(3, 4)
    ([4, 4, 2], [4, 5], [3])
    """
    if int(virtual_batch_size) < 2:
        raise ValueError(f"virtual_batch_size must be >= 2 (a virtual batch of one sample is no batch), got {virtual_batch_size}")
    if n <= virtual_batch_size:
        return [n]
    full, rest = divmod(n, virtual_batch_size)
    sizes = [virtual_batch_size] * full
    if rest == 1:
        sizes[-1] += 1
    elif rest:
        sizes.append(rest)
    return sizes


def ghost_batch_norm(
    x: ArrayLike,
    virtual_batch_size: int,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """Ghost batch normalization (Hoffer, Hubara & Soudry 2017, Algorithm 1).

    Where batch norm uses batch statistics (``training=True``, or no running statistics), the
    batch is cut along axis 0 into the virtual batches of :func:`ghost_batch_sizes`, and each
    is batch-normalized on its own, in order, by :func:`batch_norm`: its own statistics, and, in
    training, one running-statistics update per virtual batch (so the count grows by the number
    of virtual batches). Otherwise (eval with running statistics) this is :func:`batch_norm`.

    Returns:
        ``(y, new_running_mean, new_running_var, new_num_batches_tracked)`` as :func:`batch_norm`.
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="ghost_batch_norm")
    if not (training or running_mean is None):
        return batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps,
                          num_batches_tracked, unbiased)
    ys = []
    mean, var, count = running_mean, running_var, num_batches_tracked
    bounds = np.cumsum([0] + ghost_batch_sizes(x.shape[0], virtual_batch_size))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        y, mean, var, count = batch_norm(x[start:stop], mean, var, weight, bias, training, momentum,
                                         eps, count, unbiased)
        ys.append(y)
    return np.concatenate(ys, axis=0), mean, var, count


def ghost_batch_norm_backward(
    dy: ArrayLike,
    x: ArrayLike,
    virtual_batch_size: int,
    weight: ArrayLike | None = None,
    eps: float = 1e-5,
    training: bool = True,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`ghost_batch_norm`: :func:`batch_norm_backward`
    per virtual batch, the input gradients side by side, the parameter gradients summed.

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    x = _as_float64(x)
    dy = _as_float64(dy)
    if not (training or running_mean is None):
        return batch_norm_backward(dy, x, weight, eps, False, running_mean, running_var)
    if dy.shape != x.shape:
        raise ValueError(f"dy has shape {dy.shape}, expected {x.shape}")
    dxs, dweight, dbias = [], 0.0, 0.0
    bounds = np.cumsum([0] + ghost_batch_sizes(x.shape[0], virtual_batch_size))
    for start, stop in zip(bounds[:-1], bounds[1:]):
        dx, dw, db = batch_norm_backward(dy[start:stop], x[start:stop], weight, eps, True)
        dxs.append(dx)
        dweight, dbias = dweight + dw, dbias + db
    return np.concatenate(dxs, axis=0), dweight, dbias


# ---------------------------------------------------------------------------
# Batch normalization followed by an activation (normlab.layers.act)
# ---------------------------------------------------------------------------


def _activation(z: np.ndarray, act: str, negative_slope: float, alpha: float) -> np.ndarray:
    """``act(z)`` for the activations of :func:`batch_norm_act`."""
    if act == "identity":
        return z.copy()
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "leaky_relu":
        return np.where(z > 0, z, negative_slope * z)
    if act == "elu":
        return np.where(z > 0, z, alpha * np.expm1(np.minimum(z, 0.0)))
    if act == "silu":
        return z / (1.0 + np.exp(-z))
    raise ValueError(
        f"act must be one of ['identity', 'relu', 'leaky_relu', 'elu', 'silu'], got {act!r}"
    )


def _activation_derivative(z: np.ndarray, act: str, negative_slope: float, alpha: float) -> np.ndarray:
    """``act'(z)``; at the kinks (z = 0) the left derivative, as torch."""
    if act == "identity":
        return np.ones_like(z)
    if act == "relu":
        return (z > 0).astype(np.float64)
    if act == "leaky_relu":
        return np.where(z > 0, 1.0, negative_slope)
    if act == "elu":
        return np.where(z > 0, 1.0, alpha * np.exp(np.minimum(z, 0.0)))
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    raise ValueError(
        f"act must be one of ['identity', 'relu', 'leaky_relu', 'elu', 'silu'], got {act!r}"
    )


def batch_norm_act(
    x: ArrayLike,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, int]:
    """Batch normalization followed by an activation (as ``normlab.BatchNormAct2d``)::

        z = batch_norm(x, ...)          exactly :func:`batch_norm`, statistics included
        y = act(z)

    with ``act`` one of::

        identity    y = z
        relu        y = max(z, 0)
        leaky_relu  y = z if z > 0 else negative_slope * z
        elu         y = z if z > 0 else alpha * (exp(z) - 1)
        silu        y = z * sigmoid(z)

    Returns:
        ``(y, new_running_mean, new_running_var, new_num_batches_tracked)`` as
        :func:`batch_norm`.
    """
    z, rm, rv, count = batch_norm(
        x, running_mean, running_var, weight, bias, training=training, momentum=momentum,
        eps=eps, num_batches_tracked=num_batches_tracked, unbiased=unbiased,
    )
    return _activation(z, act, negative_slope, alpha), rm, rv, count


def batch_norm_act_backward(
    dy: ArrayLike,
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    training: bool = True,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    act: str = "identity",
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``L = sum(dy * y)`` for :func:`batch_norm_act`.

    The chain rule through the activation, then :func:`batch_norm_backward`::

        z = gamma * x_hat + beta          (the batch-norm output)
        g = dy * act'(z)
        dx, dweight, dbias = batch_norm_backward(g, x, ...)

    i.e. in training ``dx = (gamma / sigma) * (g - mean(g) - x_hat * mean(g * x_hat))``,
    ``dweight = sum(g * x_hat)``, ``dbias = sum(g)``. At z = 0 the left derivative is used
    (relu: 0, leaky_relu: negative_slope, elu: alpha), as torch does.

    Returns:
        ``(dx, dweight, dbias)`` with shapes ``x.shape``, (C,), (C,).
    """
    z = batch_norm(
        x, running_mean, running_var, weight, bias, training=training, eps=eps,
    )[0]
    g = _as_float64(dy) * _activation_derivative(z, act, negative_slope, alpha)
    return batch_norm_backward(
        g, x, weight, eps, training=training, running_mean=running_mean, running_var=running_var,
    )


# ---------------------------------------------------------------------------
# Batch statistics out, and in (gradient accumulation, statistics pooled across processes)
# ---------------------------------------------------------------------------


def channel_mean_var(x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and *biased* variance over every axis but 1 (two-pass)::

        mean = mean(x[:, c, ...]),    var = mean((x[:, c, ...] - mean)^2)

    Returns:
        ``(mean, var)``, each of shape (C,).
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="channel_mean_var")
    _, mean, var = _standardize(x, _all_axes_but_channel(x.ndim), 0.0)
    return mean.reshape(x.shape[1]), var.reshape(x.shape[1])


def batch_norm_with_stats(
    x: ArrayLike,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    eps: float = 1e-5,
    mask: ArrayLike | None = None,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    r_max: float | None = None,
    d_max: float | None = None,
    act: str | None = None,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Training-mode batch norm that returns its batch statistics instead of updating running ones.

    ``y`` is the training-mode output of

    * :func:`batch_norm` (no mask, no limits),
    * :func:`masked_batch_norm` with ``mask``: the statistics over the valid positions,
    * :func:`batch_renorm` with ``r_max``/``d_max`` (one given, the other at its default), which
      corrects towards ``running_mean``/``running_var``,

    followed by ``act`` (:func:`batch_norm_act`'s activations) when given; the statistics are the
    batch's mean and biased variance and ``n``, the values per channel behind them::

        mean = sum_valid(x) / n,      var = sum_valid((x - mean)^2) / n

    so that batches pool exactly (Chan et al.) and :func:`apply_batch_stats` of the pooled
    statistics is one update from all of them.

    Returns:
        ``(y, mean, var, n)``: ``y`` of the shape of ``x``, ``mean`` and ``var`` of shape (C,).
    """
    x = _as_float64(x)
    _check_channels_first(x, min_ndim=2, name="batch_norm_with_stats")
    num_channels = x.shape[1]
    axes = _all_axes_but_channel(x.ndim)
    if mask is not None:
        m = _broadcast_mask(x, mask, "batch_norm_with_stats")
        y = masked_batch_norm(x, mask, None, None, weight, bias, training=True, eps=eps)[0]
        n = int(m.sum())
        mean = np.sum(np.where(m, x, 0.0), axis=axes) / n
        deviation = np.where(m, x - _per_channel(mean, x.ndim), 0.0)
        var = np.sum(deviation * deviation, axis=axes) / n
    else:
        n = x.size // num_channels if num_channels > 0 else 0
        mean, var = channel_mean_var(x)
        if r_max is not None or d_max is not None:
            y = batch_renorm(x, running_mean, running_var, weight, bias, training=True, eps=eps,
                             r_max=3.0 if r_max is None else r_max, d_max=5.0 if d_max is None else d_max)[0]
        else:
            y = batch_norm(x, None, None, weight, bias, training=True, eps=eps)[0]
    if act is not None:
        y = _activation(y, act, negative_slope, alpha)
    return y, mean, var, n


def apply_batch_stats(
    running_mean: ArrayLike,
    running_var: ArrayLike,
    batch_mean: ArrayLike,
    batch_var: ArrayLike,
    n: int,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 0,
    unbiased: bool = True,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One running-statistics update from a batch's mean, *biased* variance and ``n`` values per
    channel, as :func:`batch_norm` makes in training: :func:`update_running_stats`, and the
    count ``num_batches_tracked + 1``. ``n = 0`` (no batch) changes nothing.

    Returns:
        ``(new_running_mean, new_running_var, new_num_batches_tracked)``.
    """
    if int(n) == 0:
        return _as_float64(running_mean).copy(), _as_float64(running_var).copy(), int(num_batches_tracked)
    new_mean, new_var = update_running_stats(running_mean, running_var, batch_mean, batch_var, n, momentum,
                                             num_batches_tracked, unbiased)
    return new_mean, new_var, int(num_batches_tracked) + 1
