"""Synchronized batch norm over ``torch.distributed`` on any backend (gloo on CPU, nccl on GPU).

In training, each process computes its count, mean and sum of squared deviations per channel;
one ``all_gather`` brings every process the others', and each pools them with Chan et al.'s
parallel formula (:func:`normlab.stats.combine_moments`), weighted by each process's count. So
uneven batches, and an empty batch on a process, give the statistics of the concatenated
batch. Backward all-reduces the per-channel sums of ``dy`` and ``dy * x_hat``, so every
process's input gradient equals that of one process holding the whole batch; the weight and
bias gradients are each process's own contribution, as with ``torch.nn.SyncBatchNorm`` (DDP
then averages them, like any parameter gradient). Inference, a single process, or no
initialized process group need no communication: the layer is then a normlab batch norm.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as NF
from .. import stats as _stats
from .base import in_backward
from .batch import _BatchNormMixin

__all__ = ["SyncBatchNorm"]


def _group_size(group: Any) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _reduce_dims(x: Tensor) -> list[int]:
    return [0] + list(range(2, x.dim()))


def _local_moments(x: Tensor, mask: Tensor | None = None) -> tuple[int, Tensor, Tensor]:
    """This process's count per channel, mean and sum of squared deviations (float32+), over
    the positions where ``mask`` (``(N, 1, *)``, broadcastable) is True if given."""
    channels, acc = x.shape[1], NF._acc_dtype(x)
    if mask is not None:
        n = NF._mask_count(x, mask)
        if n == 0:
            zeros = torch.zeros(channels, dtype=acc, device=x.device)
            return 0, zeros, zeros.clone()
        # torch.where, not a product with the mask: padding may hold NaN or inf.
        xs = torch.where(mask, x.to(acc), 0.0)
        mean = xs.sum(_reduce_dims(x)) / n
        m2 = torch.where(mask, torch.square(xs - NF._channel_view(mean, x)), 0.0).sum(_reduce_dims(x))
        return n, mean, m2
    n = x.numel() // channels if channels else 0
    if n == 0:
        zeros = torch.zeros(channels, dtype=acc, device=x.device)
        return 0, zeros, zeros.clone()
    if NF._channel_innermost(x) and n >= NF._STABLE_MIN_ROWS:
        mean, var = NF.channel_mean_var(x)
    else:
        var, mean = torch.var_mean(x.to(acc), dim=_reduce_dims(x), correction=0)
    return n, mean, var * n


def _collective_error(label: str, world: int, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"{label}: synchronizing batch statistics across {world} processes failed ({err}). A peer "
        f"process may have died or stalled; each process must call the layer the same number of "
        f"times (with an empty batch if it has no data). The wait is bounded by "
        f"torch.distributed.init_process_group(timeout=...)."
    )


class _SyncBatchNormFunction(torch.autograd.Function):
    """Forward: pooled statistics and torch's inference kernel. Backward: all-reduced sums."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world, label, mask):
        n_local, mean_l, m2_l = _local_moments(x.detach(), mask)
        acc = mean_l.dtype
        packed = torch.cat([torch.tensor([float(n_local)], dtype=acc, device=x.device), mean_l, m2_l])
        gathered = [torch.empty_like(packed) for _ in range(world)]
        try:
            dist.all_gather(gathered, packed, group=group)
        except RuntimeError as err:
            raise _collective_error(label, world, err) from err
        table = torch.stack(gathered)
        channels = x.shape[1]
        total, mean, m2 = _stats.combine_moments(table[:, 0], table[:, 1 : 1 + channels], table[:, 1 + channels :])
        var = m2 / total.clamp_min(1)
        invstd = torch.rsqrt(var + eps)
        w = None if weight is None else weight.to(acc)
        b = None if bias is None else bias.to(acc)
        if n_local == 0:
            out = NF._empty_output(x, w, b)
        else:
            out = torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
            if mask is not None:
                out = torch.where(mask, out, 0.0)  # padded positions come out as 0
        ctx.save_for_backward(x, weight, mean, invstd, total, mask)
        ctx.eps, ctx.group, ctx.world, ctx.label = eps, group, world, label
        ctx.mark_non_differentiable(mean, var, total)
        return out, mean, var, total

    @staticmethod
    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_total):
        x, weight, mean, invstd, total, mask = ctx.saved_tensors
        acc = mean.dtype
        channels = x.shape[1]
        if mask is not None:  # padded positions take no part: no gradient in, none out
            grad_out = torch.where(mask, grad_out, 0.0)
        if mask is not None and x.numel():
            dims = _reduce_dims(x)
            centered = torch.where(mask, x.to(acc) - NF._channel_view(mean, x), 0.0)
            sum_dy = grad_out.to(acc).sum(dims)
            sum_dy_xhat = (grad_out.to(acc) * centered).sum(dims) * invstd
        elif x.numel() == 0:
            sum_dy = torch.zeros(channels, dtype=acc, device=x.device)
            sum_dy_xhat = torch.zeros_like(sum_dy)
        elif NF._channel_innermost(x) and x.numel() // channels >= NF._STABLE_MIN_ROWS:
            grad_out = grad_out.contiguous(memory_format=NF._memory_format(x))
            sum_dy, sum_dy_centered = NF._channel_grad_sums(grad_out, x, mean)
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
            raise _collective_error(ctx.label, ctx.world, err) from err
        mean_dy, mean_dy_xhat = (reduced / total.clamp_min(1)).split(channels)

        grad_x = None
        if ctx.needs_input_grad[0] and x.numel():
            # dx = a (dy - mean(dy) - x_hat mean(dy x_hat)) with a = gamma / sigma, written as
            # a dy + b x + c per channel: two fused passes, no full-size temporaries.
            a = invstd if weight is None else invstd * weight.to(acc)
            b = -a * invstd * mean_dy_xhat
            c = -a * mean_dy - b * mean
            view = NF._channel_view
            grad_x = torch.addcmul(view(c, x), x.to(acc), view(b, x))
            grad_x = grad_x.addcmul_(grad_out.to(acc), view(a, x))
            if mask is not None:
                grad_x = torch.where(mask, grad_x, 0.0)
            grad_x = grad_x.to(x.dtype)
        elif ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x)
        grad_w = local[channels:].to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        grad_b = local[:channels].to(weight.dtype if weight is not None else x.dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None


class SyncBatchNorm(_BatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span every process of a group; drop-in for
    ``torch.nn.SyncBatchNorm`` that also runs on the CPU (gloo).

    Same arguments, attributes and state-dict keys as ``torch.nn.SyncBatchNorm``, but not its
    subclass: ``DistributedDataParallel`` refuses every ``torch.nn.SyncBatchNorm`` on the CPU.

    ``y = (x - mean) / sqrt(var + eps) * weight + bias`` with the mean and biased variance of the
    batch concatenated across the processes of ``process_group`` (default: the whole world).
    Each process's batch may have its own size, including 0. The running statistics, updated
    from the pooled statistics, are the same on every process. Accepts any input rank
    ``(N, C, *)``; the other arguments as :class:`normlab.BatchNorm2d`.

    Every process must call the layer together in training (a collective); a process that died
    makes the others raise a ``RuntimeError`` naming the layer once the process group's timeout
    passes, instead of waiting for ever.

    >>> import torch, normlab
    >>> bn = normlab.SyncBatchNorm(8)  # without torch.distributed: a plain batch norm
    >>> bn(torch.randn(4, 8, 3, 3)).shape
    torch.Size([4, 8, 3, 3])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        device=None,
        dtype=None,
        *,
        single_sample: Literal["error", "running"] = "error",
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
        unbiased: bool = True,
        stable_stats: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            single_sample=single_sample, on_nonfinite=on_nonfinite, unbiased=unbiased,
            stable_stats=stable_stats,
        )
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._label()}: expected input (N, C) or (N, C, *), got a {input.dim()}-D tensor; "
                f"add a batch dimension with x.unsqueeze(0)."
            )

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (``(N, C, *)``) with the statistics of every process's batch;
        ``mask`` (bool, True at valid positions, the input's shape without dimension 1) restricts
        them to the valid positions of every process and zeros the padded ones."""
        world = _group_size(self.process_group)
        if not self.training or world == 1:
            return super().forward(input, mask)
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}."
            )
        mask_view = None if mask is None else NF._mask_view(input, mask, self._label())
        out, mean, var, total = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, self.process_group, world, self._label(), mask_view
        )
        if total.device.type == "cpu" and float(total) <= 1:
            raise ValueError(
                f"{self._label()}: training needs more than one value per channel across all "
                f"{world} processes, got {int(total)}; use larger batches or drop the last partial one."
            )
        if self.running_mean is not None and self.running_var is not None:
            if self._accumulator is None:
                self._update_from_pooled(mean, var, total)
            elif not in_backward():  # inside normlab.accumulate: pool the global statistics
                self._accumulator.add(mean, var, int(total))
        return out

    def _update_from_pooled(self, mean: Tensor, var: Tensor, total: Tensor) -> None:
        # Bessel's correction with the pooled count as a tensor: no host synchronization.
        stored_var = var * (total / (total - 1).clamp_min(1)) if self.unbiased else var
        count = self.num_batches_tracked
        new_mean, new_var = _stats.update_running_stats(
            self.running_mean, self.running_var, mean, stored_var, n=0, momentum=self.momentum,
            num_batches_tracked=count, unbiased=False,  # n unused: the variance is already as stored
        )
        updated = torch.sum(mean + var).mul_(0) == 0  # finite exactly when every term is
        self._store_stats(torch.where(updated, new_mean, self.running_mean),
                          torch.where(updated, new_var, self.running_var), updated, count + updated)
