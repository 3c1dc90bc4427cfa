"""Synchronized batch norms over ``torch.distributed`` on any backend (gloo on CPU, nccl on GPU):
:class:`SyncBatchNorm`, :class:`SyncBatchRenorm` and :class:`SyncBatchNormAct`.

In training, each process computes its count, mean and sum of squared deviations per channel;
one ``all_gather`` brings every process the others', and each pools them with Chan et al.'s
parallel formula (:func:`normlab.stats.combine_moments`), weighted by each process's count. So
uneven batches, and an empty batch on a process, give the statistics of the concatenated
batch. Each layer then normalizes with them as its single-process counterpart does with one
batch's statistics:

* :class:`SyncBatchNorm`: ``y = x_hat * gamma + beta``;
* :class:`SyncBatchRenorm`: ``y = x_hat * (gamma r) + (gamma d + beta)``, Ioffe's corrections
  ``r, d`` computed from the pooled statistics and the running ones (so the same on every
  process), constants for backpropagation;
* :class:`SyncBatchNormAct`: ``y = act(x_hat * gamma + beta)``.

Backward all-reduces the per-channel sums of ``dy`` and ``dy * x_hat`` (``dy`` taken at the
affine output), so every process's input gradient equals that of one process holding the whole
batch: ``dx = a (dy - mean(dy) - x_hat mean(dy x_hat))`` with ``a = scale / sigma_B`` (scale
``gamma``, or ``gamma r`` for batch renorm) and means over the concatenated batch. The weight
and bias gradients are each process's own contribution, as with ``torch.nn.SyncBatchNorm``
(DDP then averages them, like any parameter gradient). The running statistics are updated from
the pooled statistics, the same on every process. Inference, a single process, or no
initialized process group need no communication: each layer is then its normlab counterpart
(batch norm, batch renorm, the fused batch norm + activation).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .. import functional as NF
from .. import stats as _stats
from .act import ActName, SaveMode, _BatchNormActMixin
from .base import in_backward
from .batch import _BatchNormMixin
from .renorm import Limit, _BatchRenormMixin, renorm_schedule

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "SyncBatchRenorm"]

_PAPER = renorm_schedule()


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


def _pooled_moments(
    x: Tensor, mask: Tensor | None, group: Any, world: int, label: str
) -> tuple[int, Tensor, Tensor, Tensor]:
    """``(local count, mean, biased variance, total count)`` of the batch concatenated over the
    processes of ``group``: one ``all_gather`` of every process's (count, mean, M2). The pooled
    values are computed from the same gathered table on every process, so they are identical."""
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
    return n_local, mean, m2 / total.clamp_min(1), total


class _SyncNormalize(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps) * scale + shift`` with the pooled statistics given (torch's
    inference kernel); backward all-reduces the per-channel sums of ``dy`` and ``dy * x_hat``,
    so that dx carries the pooled statistics' dependence on every process's input."""

    @staticmethod
    def forward(ctx, x, scale, shift, mean, var, total, n_local, eps, group, world, label, mask):
        acc = mean.dtype
        invstd = torch.rsqrt(var + eps)
        w, b = NF._cast(scale, acc), NF._cast(shift, acc)
        if n_local == 0:
            out = NF._empty_output(x, w, b)
        else:
            out = torch.batch_norm(x, w, b, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
        if mask is not None:
            # Padded positions come out as 0, also on a process whose every position is padding.
            out = torch.where(mask, out, 0.0)
        ctx.save_for_backward(x, scale, mean, invstd, total, mask)
        ctx.eps, ctx.group, ctx.world, ctx.label = eps, group, world, label
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
            # dx = a (dy - mean(dy) - x_hat mean(dy x_hat)) with a = scale / sigma, written as
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
        grad_b = local[:channels].to(ctx.shift_dtype) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None, None


class _SyncMixin:
    """What the synchronized layers share: input of any rank ``(N, C, *)``, the collective
    training forward, and the running-statistics update from the pooled statistics. Placed
    before the single-process mixin, whose forward serves eval and single-process training."""

    process_group: Any = None

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._label()}: expected input (N, C) or (N, C, *), got a {input.dim()}-D tensor; "
                f"add a batch dimension with x.unsqueeze(0)."
            )

    def _synchronized(self) -> int:
        """The group's size when this forward must synchronize (training, several processes), else 0."""
        if not self.training:
            return 0
        world = _group_size(self.process_group)
        return world if world > 1 else 0

    def _sync_forward(self, input: Tensor, mask: Tensor | None, world: int, renorm: bool) -> Tensor:
        """The affine output with the pooled statistics (batch renorm's corrections if ``renorm``
        and running statistics exist), and their running update (or pooling, inside accumulate)."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}."
            )
        label = self._label()
        mask_view = None if mask is None else NF._mask_view(input, mask, label)
        n_local, mean, var, total = _pooled_moments(input, mask_view, self.process_group, world, label)
        if total.device.type == "cpu" and float(total) <= 1:
            # Every process has the same total, so every process raises: none is left waiting.
            raise ValueError(
                f"{label}: training needs more than one value per channel across all "
                f"{world} processes, got {int(total)}; use larger batches or drop the last partial one."
            )
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracking = running_mean is not None and running_var is not None
        scale, shift = params["weight"], params["bias"]
        if renorm and tracking:
            # Corrections from the running statistics before this batch's update, as BatchRenorm.
            r_max, d_max = self.limits(buffers["num_batches_tracked"])
            r, d = NF._renorm_factors(mean, torch.rsqrt(var + self.eps), running_mean, running_var,
                                      r_max, d_max, self.eps)
            acc = mean.dtype
            scale, shift = NF._renorm_affine(NF._cast(scale, acc), NF._cast(shift, acc), r, d)
        out = _SyncNormalize.apply(input, scale, shift, mean, var, total, n_local, self.eps,
                                   self.process_group, world, label, mask_view)
        if tracking:
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
        updated = NF._finite_flag(mean, var)  # on the device: no synchronization, no branch
        self._store_stats(torch.where(updated, new_mean, self.running_mean),
                          torch.where(updated, new_var, self.running_var), updated, count + updated)


class SyncBatchNorm(_SyncMixin, _BatchNormMixin, nn.modules.batchnorm._BatchNorm):
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

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (``(N, C, *)``) with the statistics of every process's batch;
        ``mask`` (bool, True at valid positions, the input's shape without dimension 1) restricts
        them to the valid positions of every process and zeros the padded ones."""
        world = self._synchronized()
        if not world:
            return super().forward(input, mask)
        return self._sync_forward(input, mask, world, renorm=False)


class SyncBatchRenorm(_SyncMixin, _BatchRenormMixin, nn.modules.batchnorm._BatchNorm):
    """Batch renormalization (Ioffe 2017) whose batch statistics span every process of a group;
    the synchronized :class:`normlab.BatchRenorm2d` (any input rank ``(N, C, *)``).

    In training, with ``mu_B`` and ``sigma_B = sqrt(var_B + eps)`` of the batch concatenated over
    the processes of ``process_group`` (default: the whole world) and ``sigma = sqrt(running_var
    + eps)`` before this step's update::

        r = clip(sigma_B / sigma, 1 / r_max, r_max)      d = clip((mu_B - running_mean) / sigma, -d_max, d_max)
        y = gamma * ((x - mu_B) / sigma_B * r + d) + beta

    ``r`` and ``d`` are constants for backpropagation; the input gradient includes the pooled
    ``mu_B, sigma_B``'s dependence on every process's input (batch norm's backward with weight
    ``gamma r``, its sums all-reduced). The running statistics, updated from the pooled
    statistics, stay the same on every process, and so do ``r`` and ``d``. Eval mode, a single
    process or no process group: exactly :class:`normlab.BatchRenorm2d` (``single_sample``
    applies there; across processes, a pooled batch of one value per channel raises, as
    :class:`SyncBatchNorm`). State dict: ``BatchRenorm``'s, i.e. torch's ``BatchNorm``'s.

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype:
            as :class:`SyncBatchNorm`.
        r_max, d_max: numbers or schedules ``step -> value``, as :class:`normlab.BatchRenorm2d`
            (default Ioffe's schedule, :func:`normlab.renorm_schedule`).
        single_sample, on_nonfinite, unbiased, stable_stats: as :class:`normlab.BatchNorm2d`.

    >>> import torch, normlab
    >>> from normlab.layers.sync import SyncBatchRenorm
    >>> layer = SyncBatchRenorm(3, r_max=1.5, d_max=0.5)  # without torch.distributed: BatchRenorm
    >>> single = normlab.layers.renorm.BatchRenorm1d(3, r_max=1.5, d_max=0.5)
    >>> x = torch.randn(8, 3) * 2 + 1
    >>> torch.allclose(layer(x), single(x)), torch.equal(layer.running_var, single.running_var)
    (True, True)
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
        r_max: Limit = _PAPER["r_max"],
        d_max: Limit = _PAPER["d_max"],
        single_sample: Literal["error", "running"] = "error",
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
        unbiased: bool = True,
        stable_stats: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            r_max=r_max, d_max=d_max, single_sample=single_sample, on_nonfinite=on_nonfinite,
            unbiased=unbiased, stable_stats=stable_stats,
        )
        self.process_group = process_group

    def forward(self, input: Tensor) -> Tensor:
        """Batch renorm of ``input`` (``(N, C, *)``) with the statistics of every process's batch."""
        world = self._synchronized()
        if not world:
            return super().forward(input)
        return self._sync_forward(input, None, world, renorm=True)


class SyncBatchNormAct(_SyncMixin, _BatchNormActMixin, _BatchNormMixin, nn.modules.batchnorm._BatchNorm):
    """Batch norm followed by an activation whose batch statistics span every process of a
    group; the synchronized :class:`normlab.BatchNormAct2d` (any input rank ``(N, C, *)``).

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)`` with the mean and biased variance of
    the batch concatenated over the processes of ``process_group`` (default: the whole world);
    ``act`` one of ``"identity"``, ``"relu"`` (default), ``"leaky_relu"`` (``negative_slope``),
    ``"elu"`` (``alpha``), ``"silu"``. Gradients, running statistics and masks as
    :class:`SyncBatchNorm`'s. State dict: torch's ``BatchNorm``'s.

    Memory: in synchronized training the layer is :class:`SyncBatchNorm`'s computation followed
    by the activation, unfused, and keeps what they keep (the input, the batch-norm output and
    the result: torch's batch norm + activation); BatchNormAct's saving, which recovers
    ``x_hat`` from the output, is not applied to the synchronized path. Eval mode, a single
    process or no process group: exactly :class:`normlab.BatchNormAct2d`, fused (``save``
    applies there).

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype:
            as :class:`SyncBatchNorm`.
        act, negative_slope, alpha, save: as :class:`normlab.BatchNormAct2d`.
        single_sample, on_nonfinite, unbiased, stable_stats: as :class:`normlab.BatchNorm2d`.

    >>> import torch
    >>> from normlab.layers.sync import SyncBatchNormAct
    >>> layer = SyncBatchNormAct(3, act="leaky_relu", negative_slope=0.2)
    >>> layer.load_state_dict(torch.nn.BatchNorm1d(3).state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(8, 3, 5)
    >>> torch.allclose(layer(x), torch.nn.functional.leaky_relu(torch.nn.BatchNorm1d(3)(x), 0.2), atol=1e-6)
    True
    """

    _plain_class = SyncBatchNorm

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
        act: ActName = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        save: SaveMode = "auto",
        single_sample: Literal["error", "running"] = "error",
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
        unbiased: bool = True,
        stable_stats: bool = True,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            act=act, negative_slope=negative_slope, alpha=alpha, save=save,
            single_sample=single_sample, on_nonfinite=on_nonfinite, unbiased=unbiased,
            stable_stats=stable_stats,
        )
        self.process_group = process_group

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """``act(batch_norm(input))`` with the statistics of every process's batch; ``mask`` as
        :class:`SyncBatchNorm`'s (padded positions come out as ``act(0) = 0``)."""
        world = self._synchronized()
        if not world:
            return super().forward(input, mask)
        return self._activation.apply(self._sync_forward(input, mask, world, renorm=False))

    def split(self) -> tuple[nn.Module, nn.Module]:
        """``(SyncBatchNorm, activation)`` with this layer's state, options and process group;
        ``activation(batch_norm(x))`` equals ``self(x)``."""
        plain, activation = super().split()
        plain.process_group = self.process_group
        return plain, activation
