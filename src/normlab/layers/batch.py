"""Batch normalization layers: drop-in ``torch.nn.BatchNorm1d/2d/3d`` with better edges.

Same constructor arguments, defaults, attributes, state-dict keys and numbers as torch, plus:

* ``single_sample``: a training batch with one value per channel raises a ``ValueError`` that
  names the layer and the fixes (``"error"``, default), or is normalized with the running
  statistics, which stay unchanged (``"running"``).
* ``on_nonfinite``: a batch with NaN/inf statistics never poisons the running statistics
  (see :class:`normlab.layers.base.RunningStatsLayer`).
* ``unbiased``: store the unbiased batch variance in ``running_var`` (True, torch's convention)
  or the biased one (Keras, Flax).
* float16/bfloat16 input is normalized with float32 statistics; running statistics stay float32.
* CPU channels_last and 2-D input get statistics as accurate as NCHW input (``stable_stats``,
  default True; False takes torch's faster, less accurate kernel for those layouts).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .. import functional as NF
from .base import RunningStatsLayer, check_choice, check_eps, check_momentum, check_positive_int

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

SingleSample = Literal["error", "running"]


class _BatchNormMixin(RunningStatsLayer):
    """The forward and options shared by BatchNorm1d/2d/3d (they differ only in the input check)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        single_sample: SingleSample = "error",
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
        unbiased: bool = True,
        stable_stats: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_features", num_features)
        check_eps(owner, eps)
        check_momentum(owner, momentum)
        check_choice(owner, "single_sample", single_sample, ("error", "running"))
        super().__init__(
            num_features, eps=eps, momentum=momentum, affine=affine,
            track_running_stats=track_running_stats, device=device, dtype=dtype,
        )
        self.single_sample = single_sample
        self.unbiased = bool(unbiased)
        self.stable_stats = bool(stable_stats)
        self._init_options(on_nonfinite, dtype)

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}; check the preceding layer's output size."
            )
        # Read parameters and buffers from their dicts: Module.__getattr__ costs microseconds a
        # call, and this runs for every layer at every step.
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        tracking = running_mean is not None and running_var is not None
        use_batch_stats = self.training or not tracking
        if use_batch_stats and input.numel() == input.shape[1] and input.numel() > 0:
            if not (self.single_sample == "running" and tracking):
                raise ValueError(self._single_sample_message(input))
            use_batch_stats = False  # normalize with the running statistics, leave them as they are
        result = NF.batch_norm(
            input,
            running_mean if tracking else None,
            running_var if tracking else None,
            params["weight"],
            params["bias"],
            training=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            num_batches_tracked=buffers["num_batches_tracked"],
            unbiased=self.unbiased,
            stable_stats=self.stable_stats,
        )
        if result.updated is not None:
            self._store_stats(result.running_mean, result.running_var, result.updated)
            buffers["num_batches_tracked"].copy_(result.num_batches_tracked)
        return result.output

    def _single_sample_message(self, input: Tensor) -> str:
        return (
            f"{self._label()}: training needs more than one value per channel to compute batch "
            f"statistics, got input of shape {tuple(input.shape)}. Fixes: drop the last partial "
            f"batch (DataLoader(..., drop_last=True)); use a larger batch; use a batch-independent "
            f"norm (normlab.GroupNorm, LayerNorm); or build the layer with single_sample='running' "
            f"to normalize such batches with the running statistics, leaving them unchanged."
        )

    def extra_repr(self) -> str:
        extra = super().extra_repr()
        for key, default in (("single_sample", "error"), ("on_nonfinite", "warn"), ("unbiased", True),
                             ("stable_stats", True)):
            if getattr(self, key) != default:
                extra += f", {key}={getattr(self, key)!r}"
        return extra


class BatchNorm1d(_BatchNormMixin, nn.BatchNorm1d):
    """Batch norm over ``(N, C)`` or ``(N, C, L)`` input; drop-in for ``torch.nn.BatchNorm1d``.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` with batch statistics over all
    dimensions but C in training, running statistics in eval.

    Args:
        num_features: C.
        eps: added to the variance (default 1e-5).
        momentum: weight of the new batch in the running averages (default 0.1); None for the
            cumulative average.
        affine: learn ``weight`` (γ, init 1) and ``bias`` (β, init 0).
        track_running_stats: keep ``running_mean``, ``running_var``, ``num_batches_tracked``.
        single_sample, on_nonfinite, unbiased, stable_stats: see :mod:`normlab.layers.batch`.

    >>> import torch, normlab
    >>> bn = normlab.BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    """


class BatchNorm2d(_BatchNormMixin, nn.BatchNorm2d):
    """Batch norm over ``(N, C, H, W)`` input; drop-in for ``torch.nn.BatchNorm2d``.

    Arguments as :class:`BatchNorm1d`.

    >>> import torch, normlab
    >>> bn = normlab.BatchNorm2d(64)
    >>> bn.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
    <All keys matched successfully>
    """


class BatchNorm3d(_BatchNormMixin, nn.BatchNorm3d):
    """Batch norm over ``(N, C, D, H, W)`` input; drop-in for ``torch.nn.BatchNorm3d``.

    Arguments as :class:`BatchNorm1d`.
    """
