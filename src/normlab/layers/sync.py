"""Synchronized batch norms over ``torch.distributed`` on any backend (gloo on CPU, nccl on GPU):
:class:`SyncBatchNorm`, :class:`SyncBatchRenorm` and :class:`SyncBatchNormAct`.

In training, each process computes its count, mean and sum of squared deviations per channel;
one ``all_gather`` brings every process the others', and each pools them with Chan et al.'s
parallel formula (:func:`normlab.functional.sync.gather_moments`, which
:func:`normlab.surgery.recalibrate_bn` pools with too), weighted by each process's count. So
uneven batches, and an empty batch on a process, give the statistics of the concatenated
batch; :func:`normlab.functional.sync.sync_batch_norm` is the math. Each layer then normalizes with them as its single-process counterpart does with one
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

from typing import Any

from torch import Tensor, nn

from ..functional.sync import sync_batch_norm, world_size
from .act import _BatchNormActMixin
from .batch import _BatchNormMixin
from .renorm import _BatchRenormMixin

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "SyncBatchRenorm"]


class _SyncMixin:
    """What the synchronized layers share: input of any rank ``(N, C, *)``, a process group, and
    in training across several processes the pooled statistics of
    :func:`~normlab.functional.sync.sync_batch_norm`, which the template then stores (or pools,
    inside :func:`normlab.accumulate`). Placed before the single-process mixin, whose functional
    serves eval and single-process training."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Any | None = None, device=None, dtype=None,
                 **options) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(
                f"{self._label()}: expected input (N, C) or (N, C, *), got a {input.dim()}-D tensor; "
                f"add a batch dimension with x.unsqueeze(0)."
            )

    def _normalize(self, input, running_mean, running_var, count, training, pooling, name, options):
        if not (self.training and world_size(self.process_group) > 1):
            return super()._normalize(input, running_mean, running_var, count, training, pooling, name, options)
        options.pop("save", None)  # the synchronized path is unfused
        params = self._parameters
        return sync_batch_norm(input, params.get("weight"), params.get("bias"), self.eps, group=self.process_group,
                               running_mean=running_mean, running_var=running_var, name=name, **options)


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
        bias, single_sample, on_nonfinite, unbiased, stable_stats (keyword-only): as
            :class:`normlab.BatchNorm2d`.

    >>> import torch, normlab
    >>> from normlab.layers.sync import SyncBatchRenorm
    >>> layer = SyncBatchRenorm(3, r_max=1.5, d_max=0.5)  # without torch.distributed: BatchRenorm
    >>> single = normlab.layers.renorm.BatchRenorm1d(3, r_max=1.5, d_max=0.5)
    >>> x = torch.randn(8, 3) * 2 + 1
    >>> torch.allclose(layer(x), single(x)), torch.equal(layer.running_var, single.running_var)
    (True, True)
    """


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
        bias, single_sample, on_nonfinite, unbiased, stable_stats (keyword-only): as
            :class:`normlab.BatchNorm2d`.

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

    def split(self) -> tuple[nn.Module, nn.Module]:
        """``(SyncBatchNorm, activation)`` with this layer's state, options and process group;
        ``activation(batch_norm(x))`` equals ``self(x)``."""
        plain, activation = super().split()
        plain.process_group = self.process_group
        return plain, activation
