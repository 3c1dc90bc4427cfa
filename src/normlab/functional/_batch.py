"""Batch normalization: :func:`batch_norm`, :func:`masked_batch_norm` and the running update from
given batch statistics, :func:`apply_batch_stats`; the result types of the batch-norm family."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from ..stats import statistics_dtype
from . import _numerics as N
from ._dispatch import batch_stats_forward, kernel_updates_stats, normalize_eval

SingleSample = Literal["error", "running"]


class BatchNormResult(NamedTuple):
    """What :func:`batch_norm` and its variants return.

    Attributes:
        output: the normalized tensor, same shape and dtype as the input.
        running_mean, running_var: the new running statistics (the given ones when no update).
        num_batches_tracked: the new batch count, or what was given (possibly None).
        updated: a bool scalar tensor, True when the running statistics took this batch in and
            False when they were kept because the batch statistics were not finite; None when no
            update was attempted (eval mode, no running statistics, or a one-value batch
            normalized with the running statistics under ``single_sample="running"``).
    """

    output: Tensor
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None
    updated: Tensor | None


class RunningStats(NamedTuple):
    """What :func:`apply_batch_stats` returns; fields as in :class:`BatchNormResult`."""

    running_mean: Tensor
    running_var: Tensor
    num_batches_tracked: Tensor | None
    updated: Tensor | None


def _too_few(n: int, training_stats: bool, running_mean: Tensor | None, single_sample: str, input: Tensor,
             name: str, mask: Tensor | None = None) -> bool:
    """The single-value rule: whether a training batch of ``n`` values per channel (``0 < n < 2``)
    is normalized with the running statistics instead (``single_sample="running"``); raises
    where it cannot be."""
    if not training_stats or n >= 2 or n == 0 and mask is None:
        return False
    if single_sample == "running" and running_mean is not None:
        return True
    N.check_single_sample(single_sample, name)
    N.check_batch_count(n, input, name, mask)
    return False


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    stable_stats: bool = True,
    mask: Tensor | None = None,
    single_sample: SingleSample = "error",
    name: str = "batch_norm",
) -> BatchNormResult:
    """Batch normalization over all dimensions but the channel dimension 1.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias``, with the batch's mean and biased
    variance when ``training`` (or when no running statistics are given), else with
    ``running_mean``/``running_var``. In training, the running statistics are updated as
    :func:`normlab.stats.update_running_stats` says and returned; the arguments stay untouched.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` or None (always use batch statistics).
        weight, bias: ``(C,)`` affine parameters γ and β, or None (1 and 0).
        training: use and update batch statistics.
        momentum: weight of the new batch in the running average (torch's meaning); None for
            the cumulative average, which needs ``num_batches_tracked``.
        eps: added to the variance. Default 1e-5 as torch.
        num_batches_tracked: int64 scalar tensor, batches already in the running statistics.
        unbiased: store the unbiased batch variance in ``running_var`` (torch's convention).
        stable_stats: on the CPU, compute the batch statistics and gradient sums of
            channel-innermost input (2-D, channels_last) as accurately as for NCHW input
            (:func:`channel_mean_var`; normlab's compiled kernel, :mod:`normlab.kernels`, does
            it in torch's time, the torch-op fallback at some cost); False uses torch's kernel
            and its accuracy (see benchmarks/README.md).
        mask: optional bool tensor, True at valid positions, for padded sequences and point
            sets: the input's shape without the channel dimension (``(N,)`` for ``(N, C)``,
            ``(N, L)`` for ``(N, C, L)``, ``(N, H, W)`` for ``(N, C, H, W)``); size-1
            dimensions broadcast (``(N, 1)`` masks whole samples of ``(N, C, L)``). The batch
            statistics are over the valid positions only (``n`` = their number, also in the
            unbiased running variance), exactly batch norm over the concatenation of the valid
            parts; the output is 0 at padded positions, which get no gradient and may hold
            anything, NaN included. The mask path composes torch ops (about 2-3.5x the time of
            the unmasked kernel on the CPU) and reads the valid count on the host (one
            synchronization on accelerators, a graph break under torch.compile; vmap works with
            an unbatched mask). Without a mask nothing changes. See :func:`masked_batch_norm`.
        single_sample: a training batch with one value per channel (fewer than 2 valid positions
            under a mask) has no batch variance: ``"error"`` (default) raises a ``ValueError``;
            ``"running"`` normalizes it with the running statistics (which must be given) and
            leaves them and the count as they are (``updated`` None).
        name: the caller's name in error messages (a layer passes its label).

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[1.0], [3.0]])
    >>> r = batch_norm(x, torch.zeros(1), torch.ones(1), training=True, momentum=0.5)
    >>> r.output.squeeze(1), r.running_mean, r.running_var
    (tensor([-1.0000,  1.0000]), tensor([1.]), tensor([1.5000]))
    """
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    if mask is not None:
        return _masked(input, mask, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked, unbiased, single_sample, name)
    update = training and running_mean is not None
    if training:
        N.check_update(momentum, num_batches_tracked if update else 0, name)
    use_batch_stats = training or running_mean is None
    n = N.values_per_channel(input)
    if n < 2 and _too_few(n, use_batch_stats, running_mean, single_sample, input, name):
        use_batch_stats = update = False  # the running statistics normalize it, unchanged
    acc = statistics_dtype(input.dtype)
    w, b = N.cast(weight, acc), N.cast(bias, acc)
    if n == 0:  # an empty batch: an empty output (as torch), statistics and count untouched
        return BatchNormResult(N.empty_output(input, w, b), running_mean, running_var, num_batches_tracked, None)
    if not use_batch_stats:
        out = normalize_eval(input, N.cast(running_mean, acc), N.cast(running_var, acc), w, b, eps)
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if not update:  # batch statistics, nothing to update
        out = batch_stats_forward(input, w, b, eps, stable_stats)[0]
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    if isinstance(momentum, float) and unbiased:
        fast = kernel_updates_stats(input, w, b, running_mean, running_var, momentum, eps, stable_stats)
        if fast is not None:
            out, _, _, new_mean, new_var, updated = fast
            new_count = None if num_batches_tracked is None else num_batches_tracked + (
                1 if updated is N.TRUE else updated)
            return BatchNormResult(out, new_mean, new_var, new_count, updated)
    out, batch_mean, batch_var = batch_stats_forward(input, w, b, eps, stable_stats)
    return BatchNormResult(out, *N.guarded_update(running_mean, running_var, batch_mean, batch_var, n, momentum,
                                                  num_batches_tracked, unbiased))


def apply_batch_stats(
    running_mean: Tensor,
    running_var: Tensor,
    batch_mean: Tensor,
    batch_var: Tensor,
    n: int | Tensor,
    momentum: float | None = 0.1,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    *,
    name: str = "apply_batch_stats",
) -> RunningStats:
    """One running-statistics update from a batch's statistics, as :func:`batch_norm` makes in
    training: :func:`update_running_stats` with the batch's mean, *biased* variance and ``n``
    values per channel, and the count plus one; kept at the old values (``updated`` False) when
    the batch statistics are not finite, without a host synchronization.

    The partner of :func:`batch_norm_with_stats`: statistics pooled over micro-batches
    (:class:`normlab.stats.Moments`, Chan et al.) or over processes give, through this, the update
    that one batch of all of them would give. ``n == 0`` (nothing pooled) changes nothing.

    Args:
        running_mean, running_var: ``(C,)``, the current running statistics.
        batch_mean, batch_var: ``(C,)``, the batch's mean and biased variance.
        n: values per channel behind them, an int >= 2, or a scalar tensor (Bessel's correction
            then stays on the device).
        momentum, num_batches_tracked, unbiased: as :func:`batch_norm`.
        name: the caller's name in error messages.

    Returns:
        :class:`RunningStats` ``(running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> r = apply_batch_stats(torch.zeros(1), torch.ones(1), torch.tensor([2.0]), torch.tensor([1.0]), 3,
    ...                       momentum=0.5, num_batches_tracked=torch.tensor(4))
    >>> r.running_mean, r.running_var, int(r.num_batches_tracked), bool(r.updated)
    (tensor([1.]), tensor([1.2500]), 5, True)
    """
    N.check_update(momentum, num_batches_tracked, name)
    if not isinstance(n, Tensor) and n == 0:
        return RunningStats(running_mean, running_var, num_batches_tracked, None)
    return RunningStats(*N.guarded_update(running_mean, running_var, batch_mean, batch_var, n, momentum,
                                          num_batches_tracked, unbiased))


# --------------------------------------------------------------------------------------------
# Masked batch norm
# --------------------------------------------------------------------------------------------


def masked_stats_forward(
    x: Tensor, m: Tensor, count: int, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode batch norm over the positions where ``m`` (``(N, 1, *)``) is True:
    ``(output, mean, biased var)``, output 0 at padded positions; differentiable in x, weight, bias.

    Composed of torch ops (autograd gives the exact gradient, including the statistics'
    dependence on the valid x). Two-pass statistics: the deviations are formed before squaring,
    and the output from them (subtract-first), so large offsets lose nothing.
    """
    acc = statistics_dtype(x.dtype)
    axes = N.reduce_dims(x)
    xa = x if x.dtype == acc else x.to(acc)
    # torch.where rather than a product with the mask: padded values may be NaN or inf.
    mean = torch.where(m, xa, 0).sum(axes) / count
    centered = torch.where(m, xa - N.channel_view(mean, x), 0)
    var = centered.square().sum(axes) / count
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    if bias is None:  # centered is 0 at padded positions already
        out = centered * N.channel_view(scale, x)
    else:
        out = torch.where(m, torch.addcmul(N.channel_view(bias, x), centered, N.channel_view(scale, x)), 0)
    return out.to(x.dtype), mean, var


def masked_batch_norm(
    input: Tensor,
    mask: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    unbiased: bool = True,
    single_sample: SingleSample = "error",
    name: str = "masked_batch_norm",
) -> BatchNormResult:
    """Batch normalization over the valid positions of a padded batch.

    ``mask`` is bool, True at valid positions, with the input's shape without the channel
    dimension (size-1 dimensions broadcast). Per channel, with ``K`` valid positions::

        mean = sum_valid(x) / K,   var = sum_valid((x - mean)^2) / K
        y    = (x - mean) / sqrt(var + eps) * weight + bias   at valid positions, 0 at padded ones

    exactly :func:`batch_norm` of the concatenation of the valid parts, put back in place. Padded
    values never enter (they may be NaN) and get no gradient. The running statistics are updated
    as in :func:`batch_norm` with ``n = K``. :func:`batch_norm` with ``mask=`` is this function.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        mask: bool, as above.
        running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            unbiased, single_sample, name: as :func:`batch_norm`.

    Returns:
        :class:`BatchNormResult` ``(output, running_mean, running_var, num_batches_tracked, updated)``.

    >>> import torch
    >>> x = torch.tensor([[1.0], [3.0], [float("nan")]])
    >>> masked_batch_norm(x, torch.tensor([True, True, False]), training=True).output.squeeze(1)
    tensor([-1.0000,  1.0000,  0.0000])
    """
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    return _masked(input, mask, running_mean, running_var, weight, bias, training, momentum, eps,
                   num_batches_tracked, unbiased, single_sample, name)


def _masked(input, mask, running_mean, running_var, weight, bias, training, momentum, eps, num_batches_tracked,
            unbiased, single_sample, name) -> BatchNormResult:
    """:func:`masked_batch_norm` after the checks every batch norm makes."""
    update = training and running_mean is not None
    if training:
        N.check_update(momentum, num_batches_tracked if update else 0, name)
    m = N.mask_view(input, mask, name)
    acc = statistics_dtype(input.dtype)
    w, b = N.cast(weight, acc), N.cast(bias, acc)
    if N.values_per_channel(input) == 0:
        return BatchNormResult(N.empty_output(input, w, b), running_mean, running_var, num_batches_tracked, None)
    use_batch_stats = training or running_mean is None
    n = N.mask_count(input, m) if use_batch_stats else 0
    if n < 2 and _too_few(n, use_batch_stats, running_mean, single_sample, input, name, mask):
        use_batch_stats = update = False
    if not use_batch_stats:
        # Zero the padding first: NaN there would reach the weight gradient through x_hat.
        out = normalize_eval(torch.where(m, input, 0), N.cast(running_mean, acc), N.cast(running_var, acc), w, b, eps)
        return BatchNormResult(torch.where(m, out, 0), running_mean, running_var, num_batches_tracked, None)
    out, batch_mean, batch_var = masked_stats_forward(input, m, n, w, b, eps)
    if not update:
        return BatchNormResult(out, running_mean, running_var, num_batches_tracked, None)
    return BatchNormResult(out, *N.guarded_update(running_mean, running_var, batch_mean.detach(),
                                                  batch_var.detach(), n, momentum, num_batches_tracked, unbiased))
