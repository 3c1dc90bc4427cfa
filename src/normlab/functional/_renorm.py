"""Batch renormalization (Ioffe 2017): :func:`batch_renorm` and the corrections it shares with the
synchronized layer and with :func:`batch_norm_with_stats`."""

from __future__ import annotations

import torch
from torch import Tensor

from ..stats import statistics_dtype
from . import _numerics as N
from ._batch import BatchNormResult, SingleSample, _too_few, batch_norm
from ._dispatch import _BatchNormGivenStats, _NormalizeWithStats, accurate_mean_var, fast_kernel_ok


def renorm_factors(
    mean: Tensor, invstd: Tensor, running_mean: Tensor, running_var: Tensor,
    r_max: float | Tensor, d_max: float | Tensor, eps: float,
) -> tuple[Tensor, Tensor]:
    """Ioffe's corrections from the batch mean and ``1 / sigma_B`` and the running statistics:
    ``r = clip(sigma_B / sigma, 1 / r_max, r_max)``, ``d = clip((mu_B - mu) / sigma, -d_max, d_max)``
    with ``sigma = sqrt(running_var + eps)``; detached (constants for backpropagation)."""
    inv_sigma = torch.rsqrt(running_var.to(mean.dtype) + eps)
    if isinstance(r_max, Tensor):
        r_max = r_max.to(mean.dtype)
    if isinstance(d_max, Tensor):
        d_max = d_max.to(mean.dtype)
    r_min = 1.0 / r_max if not isinstance(r_max, Tensor) else r_max.reciprocal()
    r = torch.clamp(inv_sigma / invstd, r_min, r_max)
    d = torch.clamp((mean - running_mean.to(mean.dtype)) * inv_sigma, -d_max, d_max)
    return r.detach(), d.detach()


def renorm_affine(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """The per-channel affine map of batch renorm on x_hat: ``y = x_hat * (gamma r) + (gamma d + beta)``;
    differentiable in gamma and beta, so autograd gives ``dgamma = sum(dy (x_hat r + d))``."""
    scale = r if weight is None else weight * r
    shift = d if weight is None else weight * d
    return scale, shift if bias is None else shift + bias


def check_renorm_limits(r_max: object, d_max: object, name: str) -> None:
    for key, value, low in (("r_max", r_max, 1.0), ("d_max", d_max, 0.0)):
        if isinstance(value, Tensor):
            continue  # a schedule's value on the device: checking it would synchronize
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name}: {key} must be a number >= {low:g}, got {type(value).__name__} {value!r}.")
        if not value >= low:
            raise ValueError(
                f"{name}: {key} must be >= {low:g} ({'r_max = 1' if key == 'r_max' else 'd_max = 0'} "
                f"turns the correction off), got {value!r}."
            )


def renorm_train(
    input: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    r_max: float | Tensor,
    d_max: float | Tensor,
    stable_stats: bool = True,
) -> tuple[Tensor, Tensor, Tensor, bool]:
    """Training-mode batch renorm without the running update: ``(output, batch_mean, biased
    batch_var, known_finite)``, the statistics detached, in float32 for 16-bit input.
    ``known_finite`` is True when the statistics were checked finite on the host (CPU)."""
    acc = statistics_dtype(input.dtype)
    w, b = N.cast(weight, acc), N.cast(bias, acc)
    n = N.values_per_channel(input)
    if (fast_kernel_ok(input, stable_stats, n, weight, bias, running_mean, running_var)
            and input.device.type in ("cpu", "cuda")):
        # torch's statistics kernel (the passes its training kernel makes before normalizing),
        # then its inference kernel applies gamma r and gamma d + beta: torch's training cost.
        mean, var = torch.batch_norm_update_stats(input.detach(), None, None, 1.0)
        invstd = torch.rsqrt(var + eps)
        on_cpu = input.is_cpu
        # On the CPU, one host read says both that the statistics are finite and that the
        # kernel's x * a + b form keeps its precision; the other batches take the general path.
        if not on_cpu or N.precise(mean, invstd):
            r, d = renorm_factors(mean, invstd, running_mean, running_var, r_max, d_max, eps)
            scale, shift = renorm_affine(w, b, r, d)
            return _NormalizeWithStats.apply(input, scale, shift, mean, var, eps), mean, var, on_cpu
    mean, var, low = accurate_mean_var(input.detach(), eps, stable_stats)
    r, d = renorm_factors(mean, torch.rsqrt(var + eps), running_mean, running_var, r_max, d_max, eps)
    scale, shift = renorm_affine(w, b, r, d)
    out = _BatchNormGivenStats.apply(input, scale, shift, mean, var, eps, N.ill_conditioned(mean, var, eps), low)
    return out, mean, var, False


def batch_renorm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    stable_stats: bool = True,
    single_sample: SingleSample = "error",
    name: str = "batch_renorm",
) -> BatchNormResult:
    """Batch renormalization (Ioffe 2017): batch norm corrected towards the running statistics.

    In training, per channel, with the batch mean ``mu_B``, ``sigma_B = sqrt(var_B + eps)``
    (biased ``var_B``) and ``sigma = sqrt(running_var + eps)`` before this batch's update::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)        d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    with ``r`` and ``d`` constants for backpropagation (detached), so
    ``dgamma = sum(dy * (x_hat r + d))``, ``dbeta = sum(dy)`` and dx is batch norm's with
    weight ``gamma r``. The running statistics are then updated as by :func:`batch_norm`
    (torch's momentum, unbiased variance, ``num_batches_tracked + 1``) and returned. With
    ``r_max = 1`` and ``d_max = 0`` (r = 1, d = 0) this is batch norm. In eval mode, or without
    running statistics (r = 1, d = 0), it is :func:`batch_norm`.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        running_mean, running_var: ``(C,)``, or None (then plain batch norm).
        weight, bias: ``(C,)`` or None.
        training, momentum, eps, num_batches_tracked, unbiased, stable_stats, single_sample,
            name: as :func:`batch_norm`.
        r_max: the largest correction of the scale (>= 1; default 3, the paper's final value).
        d_max: the largest correction of the shift (>= 0; default 5, the paper's final value).
            Either may be a 0-dim tensor (a schedule's value; not checked, to stay on the device).

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[1.0], [3.0]])   # batch mean 2, std 1; running mean 0, var 1
    >>> r = batch_renorm(x, torch.zeros(1), torch.ones(1), training=True, r_max=3.0, d_max=1.0, eps=1e-12)
    >>> r.output.squeeze(1)                # x_hat * 1 + clip(2, -1, 1)
    tensor([0., 2.])
    """
    check_renorm_limits(r_max, d_max, name)
    if not training or running_mean is None or running_var is None:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          num_batches_tracked=num_batches_tracked, unbiased=unbiased, stable_stats=stable_stats,
                          single_sample=single_sample, name=name)
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    N.check_update(momentum, num_batches_tracked, name)
    n = N.values_per_channel(input)
    if n < 2 and _too_few(n, True, running_mean, single_sample, input, name):
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps,
                          num_batches_tracked=num_batches_tracked, name=name)
    if n == 0:  # an empty batch: an empty output, statistics and count untouched
        acc = statistics_dtype(input.dtype)
        out = N.empty_output(input, N.cast(weight, acc), N.cast(bias, acc))
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    out, mean, var, known_finite = renorm_train(
        input, running_mean, running_var, weight, bias, eps, r_max, d_max, stable_stats
    )
    return BatchNormResult(out, *N.guarded_update(running_mean, running_var, mean, var, n, momentum,
                                                  num_batches_tracked, unbiased, known_finite))
