"""A training step's batch norm that returns its batch statistics instead of updating running
ones: :func:`batch_norm_with_stats`, for statistics pooled over micro-batches
(:func:`normlab.accumulate`) and applied once with :func:`apply_batch_stats`."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..stats import statistics_dtype
from . import _numerics as N
from ._batch import SingleSample, _too_few, batch_norm, masked_stats_forward
from ._dispatch import batch_stats_forward
from ._renorm import check_renorm_limits, renorm_train
from .act import ActName, SaveMode, _unfused, activation, check_save, fused_with_stats


class BatchStats(NamedTuple):
    """What :func:`batch_norm_with_stats` (and :func:`normlab.functional.sync.sync_batch_norm`) return.

    Attributes:
        output: the input normalized with its own batch statistics, same shape and dtype.
        mean, var: the batch's per-channel mean and *biased* variance (divisor ``count``), detached;
            float32 for 16-bit input. Zeros for an empty batch.
        count: the number of values per channel behind them (valid positions under a mask), an int
            (a scalar tensor, the same on every process, for the statistics pooled across processes).
    """

    output: Tensor
    mean: Tensor
    var: Tensor
    count: int | Tensor


def batch_norm_with_stats(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    mask: Tensor | None = None,
    stable_stats: bool = True,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    r_max: float | Tensor | None = None,
    d_max: float | Tensor | None = None,
    act: ActName | None = None,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    save: SaveMode = "auto",
    single_sample: SingleSample = "error",
    name: str = "batch_norm_with_stats",
) -> BatchStats:
    """Training-mode batch norm that returns the batch statistics instead of updating running ones.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the batch's mean and biased variance
    (over the valid positions when ``mask`` is given, as in :func:`batch_norm`), computed as
    :func:`batch_norm` computes them in training. The statistics come back as sufficient
    statistics ``(mean, var, count)``, which pool exactly across batches (Chan et al.): this is
    what :func:`normlab.accumulate` uses to update the running statistics once per optimizer step
    (:func:`apply_batch_stats`). The batch-norm variants that pool ask for their own forward:

    * ``r_max``, ``d_max``: batch renormalization (:func:`batch_renorm`), corrected towards
      ``running_mean`` and ``running_var``, which are read, not updated (no mask);
    * ``act``: the activation after the norm, fused as :func:`batch_norm_act` fuses it.

    Args:
        input: ``(N, C)`` or ``(N, C, *)``.
        weight, bias: ``(C,)`` or None.
        eps: added to the variance (default 1e-5).
        mask: bool, True at valid positions; shapes as in :func:`batch_norm`.
        stable_stats: as in :func:`batch_norm`.
        running_mean, running_var: ``(C,)`` or None: batch renorm's reference, and what normalizes a
            one-value batch under ``single_sample="running"`` (then nothing is pooled: zeros and a
            count of 0).
        r_max, d_max: batch renorm's limits (None: plain batch norm; one given, the other takes
            :func:`batch_renorm`'s default).
        act, negative_slope, alpha, save: the fused activation (None: none), as :func:`batch_norm_act`.
        single_sample, name: as :func:`batch_norm`.

    Returns:
        :class:`BatchStats` ``(output, mean, var, count)``.

    >>> import torch
    >>> r = batch_norm_with_stats(torch.tensor([[1.0], [3.0], [8.0]]), mask=torch.tensor([True, True, False]))
    >>> r.output.squeeze(1), r.mean, r.var, r.count
    (tensor([-1.0000,  1.0000,  0.0000]), tensor([2.]), tensor([1.]), 2)
    """
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    channels = input.shape[1]
    renorm = r_max is not None or d_max is not None
    if renorm:
        r_max, d_max = 3.0 if r_max is None else r_max, 5.0 if d_max is None else d_max
        check_renorm_limits(r_max, d_max, name)
        if running_mean is None or mask is not None:
            raise ValueError(
                f"{name}: r_max and d_max (batch renorm) correct the batch towards running_mean and "
                f"running_var: give both, and no mask (batch renorm takes none)."
            )
    fn = None if act is None else activation(act, negative_slope, alpha, name=name)
    if fn is not None:
        check_save(save, name)
    acc = statistics_dtype(input.dtype)
    w, b = N.cast(weight, acc), N.cast(bias, acc)
    m = None if mask is None else N.mask_view(input, mask, name)
    zeros = torch.zeros(channels, dtype=acc, device=input.device)
    if N.values_per_channel(input) == 0:
        out = N.empty_output(input, w, b)
        return BatchStats(out if fn is None else fn.apply(out), zeros, zeros.clone(), 0)
    n = N.values_per_channel(input) if m is None else N.mask_count(input, m)
    if n < 2 and _too_few(n, True, running_mean, single_sample, input, name, mask):
        # Normalized with the running statistics, which it leaves alone: nothing to pool.
        out = batch_norm(input, running_mean, running_var, weight, bias, False, eps=eps, mask=mask, name=name).output
        return BatchStats(out if fn is None else fn.apply(out), zeros, zeros.clone(), 0)
    if m is not None:
        out, mean, var = masked_stats_forward(input, m, n, w, b, eps)
    elif renorm:
        out, mean, var, _ = renorm_train(input, running_mean, running_var, weight, bias, eps, r_max, d_max,
                                         stable_stats)
    elif fn is not None and not _unfused(input, weight, bias):
        return BatchStats(*fused_with_stats(input, weight, bias, eps, stable_stats, fn, save), n)
    else:
        out, mean, var = batch_stats_forward(input, w, b, eps, stable_stats)
    return BatchStats(out if fn is None else fn.apply(out), mean.detach(), var.detach(), n)
