"""Moments pooled across processes, and batch norm with statistics over every process's batch.

* :func:`gather_moments`: every process's per-channel ``(count, mean, M2)``, one
  ``all_gather``, pooled with Chan et al.'s parallel formula (:func:`normlab.stats.combine_moments`)
  identically on every process. The synchronized layers (:mod:`normlab.layers.sync`) and
  :func:`normlab.surgery.recalibrate_bn` both pool with it.
* :func:`sync_batch_norm`: training-mode batch norm (or batch renorm, or batch norm + activation)
  whose statistics are those of the batch concatenated over the processes of a group, with a
  backward that all-reduces the per-channel sums of ``dy`` and ``dy * x_hat``, so every process's
  input gradient equals that of one process holding the whole batch:
  ``dx = a (dy - mean(dy) - x_hat mean(dy x_hat))`` with ``a = scale / sigma_B`` and means over
  the concatenated batch. Weight and bias gradients are each process's own contribution, as with
  ``torch.nn.SyncBatchNorm`` (DDP averages them). It returns the pooled statistics, for the
  caller's running update (:func:`normlab.functional.apply_batch_stats`) or pooling.

Collectives run over ``torch.distributed`` (gloo on CPU, nccl on GPU); every process must make the
same calls. A failed collective raises a ``RuntimeError`` naming the caller.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from .. import stats as _stats
from ..stats import statistics_dtype
from . import _numerics as N
from ._dispatch import channel_grad_sums, channel_mean_var
from ._renorm import check_renorm_limits, renorm_affine, renorm_factors
from ._with_stats import BatchStats
from .act import activation

__all__ = ["gather_moments", "local_moments", "sync_batch_norm", "world_size"]


def world_size(group: Any = None) -> int:
    """The number of processes in ``group`` (default: the whole world); 1 without an initialized
    process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size() if group is None else dist.get_world_size(group)


def local_moments(x: Tensor, mask: Tensor | None = None) -> tuple[int, Tensor, Tensor]:
    """This process's count per channel, mean and sum of squared deviations (float32+), over
    the positions where ``mask`` (``(N, 1, *)``, broadcastable) is True if given."""
    channels, acc = x.shape[1], statistics_dtype(x.dtype)
    n = N.values_per_channel(x) if mask is None else N.mask_count(x, mask)
    if n == 0:
        zeros = torch.zeros(channels, dtype=acc, device=x.device)
        return 0, zeros, zeros.clone()
    dims = N.reduce_dims(x)
    if mask is not None:
        # torch.where, not a product with the mask: padding may hold NaN or inf.
        xs = torch.where(mask, x.to(acc), 0.0)
        mean = xs.sum(dims) / n
        return n, mean, torch.where(mask, torch.square(xs - N.channel_view(mean, x)), 0.0).sum(dims)
    if N.blocked(x, True):
        mean, var = channel_mean_var(x)
    else:
        var, mean = torch.var_mean(x.to(acc), dim=dims, correction=0)
    return n, mean, var * n


def _collective_error(name: str, world: int, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{name}: synchronizing batch statistics across {world} processes failed ({err}). A peer "
        f"process may have died or stalled; each process must make the same calls (a synchronized "
        f"layer: the same number of forwards, with an empty batch if it has no data). The wait is "
        f"bounded by torch.distributed.init_process_group(timeout=...)."
    )


def gather_moments(
    parts: Sequence[tuple[int | float, Tensor | None, Tensor | None]],
    channels: Sequence[int],
    *,
    sums: Sequence[float] = (),
    group: Any = None,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str | None = None,
    name: str = "gather_moments",
) -> tuple[list[tuple[Tensor, Tensor, Tensor]], list[float]]:
    """The moments of every process's parts pooled over the processes of ``group``.

    Each process gives, per part, its ``(count, mean, M2)`` over ``channels[i]`` channels (mean and
    M2 may be None for a count of 0) and a few plain numbers ``sums``. One ``all_gather`` brings
    every process all of them; each part is pooled with :func:`normlab.stats.combine_moments`
    (the between-process term included), the same on every process, and ``sums`` are added up.

    Returns:
        ``([(total, mean, M2) per part], [sum of each of sums])``, the totals as scalar tensors.

    >>> import torch
    >>> [(n, mean, m2)], [] = gather_moments([(2, torch.tensor([1.0]), torch.tensor([2.0]))], [1])
    >>> float(n), mean, m2     # one process: its own moments
    (2.0, tensor([1.], dtype=torch.float64), tensor([2.], dtype=torch.float64))
    """
    packed = [torch.tensor([float(v) for v in sums], dtype=dtype, device=device)]
    for (count, mean, m2), size in zip(parts, channels):
        packed.append(torch.tensor([float(count)], dtype=dtype, device=device))
        for t in (mean, m2):
            packed.append(torch.zeros(size, dtype=dtype, device=device) if count == 0 or t is None
                          else t.to(dtype=dtype, device=device))
    local = torch.cat(packed)
    world = world_size(group)
    if world > 1:
        gathered = [torch.empty_like(local) for _ in range(world)]
        try:
            if group is None:
                dist.all_gather(gathered, local)
            else:
                dist.all_gather(gathered, local, group=group)
        except RuntimeError as err:
            raise _collective_error(name, world, err) from err
        table = torch.stack(gathered)
    else:
        table = local.unsqueeze(0)
    offset = len(sums)
    pooled = []
    for size in channels:
        counts = table[:, offset]
        means = table[:, offset + 1: offset + 1 + size]
        m2s = table[:, offset + 1 + size: offset + 1 + 2 * size]
        offset += 1 + 2 * size
        pooled.append(_stats.combine_moments(counts, means, m2s))
    return pooled, [float(v) for v in table[:, : len(sums)].sum(0)]


class _SyncNormalize(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps) * scale + shift`` with the pooled statistics given (torch's
    inference kernel); backward all-reduces the per-channel sums of ``dy`` and ``dy * x_hat``,
    so that dx carries the pooled statistics' dependence on every process's input."""

    @staticmethod
    def forward(ctx, x, scale, shift, mean, var, total, n_local, eps, group, world, name, mask):
        acc = mean.dtype
        invstd = torch.rsqrt(var + eps)
        w, b = N.cast(scale, acc), N.cast(shift, acc)
        if n_local == 0:
            out = N.empty_output(x, w, b)
        else:
            out = torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        if mask is not None:
            # Padded positions come out as 0, also on a process whose every position is padding.
            out = torch.where(mask, out, 0.0)
        ctx.save_for_backward(x, scale, mean, invstd, total, mask)
        ctx.eps, ctx.group, ctx.world, ctx.name = eps, group, world, name
        ctx.shift_dtype = None if shift is None else shift.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, mean, invstd, total, mask = ctx.saved_tensors
        acc = mean.dtype
        channels = x.shape[1]
        if mask is not None:  # padded positions take no part: no gradient in, none out
            grad_out = torch.where(mask, grad_out, 0.0)
        if mask is not None and x.numel():
            dims = N.reduce_dims(x)
            centered = torch.where(mask, x.to(acc) - N.channel_view(mean, x), 0.0)
            sum_dy = grad_out.to(acc).sum(dims)
            sum_dy_xhat = (grad_out.to(acc) * centered).sum(dims) * invstd
        elif x.numel() == 0:
            sum_dy = torch.zeros(channels, dtype=acc, device=x.device)
            sum_dy_xhat = torch.zeros_like(sum_dy)
        elif N.blocked(x, True):
            grad_out = grad_out.contiguous(memory_format=N.memory_format(x))
            sum_dy, sum_dy_centered = channel_grad_sums(grad_out, x, mean)
            sum_dy_xhat = sum_dy_centered * invstd
        else:
            # torch's backward kernel with weight None returns exactly these two local sums.
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_out, x, None, None, None, mean, invstd, True, ctx.eps, [False, True, True],
            )
            sum_dy_xhat, sum_dy = sum_dy_xhat.to(acc), sum_dy.to(acc)
        local = torch.cat([sum_dy, sum_dy_xhat])
        reduced = local.clone()
        try:
            dist.all_reduce(reduced, group=ctx.group)
        except RuntimeError as err:
            raise _collective_error(ctx.name, ctx.world, err) from err
        mean_dy, mean_dy_xhat = (reduced / total.clamp_min(1)).split(channels)

        grad_x = None
        if ctx.needs_input_grad[0] and x.numel():
            # dx = a (dy - mean(dy) - x_hat mean(dy x_hat)) with a = scale / sigma, written as
            # a dy + b x + c per channel: two fused passes, no full-size temporaries.
            a = invstd if weight is None else invstd * weight.to(acc)
            b = -a * invstd * mean_dy_xhat
            c = -a * mean_dy - b * mean
            view = N.channel_view
            grad_x = torch.addcmul(view(c, x), x.to(acc), view(b, x))
            grad_x = grad_x.addcmul_(grad_out.to(acc), view(a, x))
            if mask is not None:
                grad_x = torch.where(mask, grad_x, 0.0)
            grad_x = grad_x.to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
        grad_w = local[channels:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = local[:channels].to(ctx.shift_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


def sync_batch_norm(
    input: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    group: Any = None,
    mask: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    r_max: float | Tensor | None = None,
    d_max: float | Tensor | None = None,
    act: str | None = None,
    negative_slope: float = 0.01,
    alpha: float = 1.0,
    name: str = "sync_batch_norm",
) -> BatchStats:
    """Training-mode batch norm with the statistics of the batch concatenated over the processes
    of ``group`` (default: the whole world): uneven batches, and an empty batch on a process, give
    the statistics of the concatenation. A collective: every process must call it together.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the pooled mean and biased variance;
    with ``r_max``/``d_max`` (and the running statistics) batch renorm's
    ``y = x_hat * (gamma r) + (gamma d + beta)``, Ioffe's ``r, d`` from the pooled and running
    statistics (so the same on every process); with ``act`` the activation after it
    (unfused). ``mask`` as :func:`normlab.functional.batch_norm`'s, over every process's valid
    positions (padded positions give ``act(0) = 0``). The running statistics are read, never
    updated: the pooled statistics come back for the caller's update.

    Returns:
        :class:`~normlab.functional.BatchStats` ``(output, mean, var, count)``: the pooled mean
        and biased variance, and the pooled count as a scalar tensor (the same on every process).

    >>> import torch
    >>> r = sync_batch_norm(torch.tensor([[1.0], [3.0]]), eps=1e-12)   # one process
    >>> r.output.squeeze(1), r.mean, r.var, int(r.count)
    (tensor([-1.,  1.]), tensor([2.]), tensor([1.]), 2)
    """
    N.check_batch_args(input, name, running_mean, running_var, weight, bias, eps)
    fn = None if act is None else activation(act, negative_slope, alpha, name=name)
    renorm = (r_max is not None or d_max is not None) and running_mean is not None
    if renorm:
        r_max, d_max = 3.0 if r_max is None else r_max, 5.0 if d_max is None else d_max
        check_renorm_limits(r_max, d_max, name)
    view = None if mask is None else N.mask_view(input, mask, name)
    world = world_size(group)
    n_local, mean_l, m2_l = local_moments(input.detach(), view)
    [(total, mean, m2)], _ = gather_moments([(n_local, mean_l, m2_l)], [input.shape[1]], group=group,
                                            dtype=mean_l.dtype, device=input.device, name=name)
    var = m2 / total.clamp_min(1)
    if total.is_cpu:
        # Every process has the same total, so every process raises: none is left waiting.
        N.check_batch_count(float(total), input, name, where=f" ({int(total)} across the {world} processes)")
    scale, shift = weight, bias
    if renorm:
        # Corrections from the running statistics before this batch's update, as batch renorm.
        r, d = renorm_factors(mean, torch.rsqrt(var + eps), running_mean, running_var, r_max, d_max, eps)
        scale, shift = renorm_affine(N.cast(scale, mean.dtype), N.cast(shift, mean.dtype), r, d)
    out = _SyncNormalize.apply(input, scale, shift, mean, var, total, n_local, eps, group, world, name, view)
    return BatchStats(out if fn is None else fn.apply(out), mean, var, total)
