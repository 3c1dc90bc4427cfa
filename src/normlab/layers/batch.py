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
* CPU channels_last and 2-D input get statistics and gradients as accurate as NCHW input
  (``stable_stats``, default True; False takes torch's less accurate kernel for those layouts;
  see :mod:`normlab.kernels` for the compiled kernel that makes the default as fast).
* ``forward(input, mask=None)``: a bool ``mask`` (True at valid positions; the input's shape
  without the channel dimension, e.g. ``(N, L)`` for ``(N, C, L)``) restricts the statistics to
  the valid positions of padded sequences or point sets: exactly batch norm over the
  concatenation of the valid parts. Padded positions come out as 0 and get no gradient (see
  :func:`normlab.functional.batch_norm`).
* Gradient accumulation: inside ``with normlab.accumulate(model):`` each micro-batch is
  normalized with its own statistics, and the running statistics take all micro-batches in as
  one batch, once per optimizer step (see :func:`normlab.accumulate`).
* Recompute-safe: under ``torch.utils.checkpoint`` the running statistics take each training
  step in once, not twice as torch's layers do (see :class:`normlab.layers.base.RunningStatsLayer`).
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .. import functional as NF
from .base import (
    RunningStatsLayer,
    check_choice,
    check_eps,
    check_momentum,
    check_positive_int,
    in_backward,
)

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]

SingleSample = Literal["error", "running"]


class _BatchNormMixin(RunningStatsLayer):
    """The forward and options shared by BatchNorm1d/2d/3d (they differ only in the input check)."""

    # Set by normlab.accumulate for the duration of its block: an object with
    # add(mean, var, count) that pools the micro-batches' statistics instead of updating.
    _accumulator = None

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

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (``(N, C, *)``); ``mask`` (bool, True at valid positions, the
        input's shape without dimension 1) restricts the statistics to the valid positions and
        zeros the padded ones (see :mod:`normlab.layers.batch`)."""
        tracking, use_batch_stats = self._begin(input, mask)
        # Read parameters and buffers from their dicts: Module.__getattr__ costs microseconds a
        # call, and this runs for every layer at every step.
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if use_batch_stats and tracking and self._accumulator is not None:
            # Inside normlab.accumulate: normalize with this micro-batch's statistics and pool
            # them; the running statistics move once, at the optimizer step.
            stats = NF.batch_norm_with_stats(
                input, params["weight"], params["bias"], self.eps, mask=mask, stable_stats=self.stable_stats
            )
            if not in_backward():  # a checkpoint's recomputation was pooled at the original forward
                self._accumulator.add(stats.mean, stats.var, stats.count)
            return stats.output
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
            mask=mask,
        )
        if result.updated is not None:
            self._store_stats(result.running_mean, result.running_var, result.updated, result.num_batches_tracked)
        return result.output

    def _too_few_valid(self, input: Tensor, mask: Tensor) -> bool:
        return NF._mask_count(input, mask.unsqueeze(1)) < 2

    def _apply_accumulated(self, mean: Tensor, var: Tensor, count: int) -> None:
        """One running-statistics update from pooled statistics (mean, biased variance, count),
        as from one batch of ``count`` values per channel; called by :func:`normlab.accumulate`."""
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if running_mean is None or running_var is None or count == 0:
            return
        new_mean, new_var, new_count, updated = NF._guarded_update(
            running_mean, running_var, mean, var, count, self.momentum, buffers["num_batches_tracked"],
            self.unbiased,
        )
        self._store_stats(new_mean, new_var, updated, new_count)

    def _begin(self, input: Tensor, mask: Tensor | None = None) -> tuple[bool, bool]:
        """The checks every batch-norm variant's forward starts with: rank, channels, mask, and a
        batch with one value per channel (an error, or with ``single_sample="running"`` the
        running statistics). Returns ``(tracking, use_batch_stats)``."""
        self._check_input_dim(input)
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}; check the preceding layer's output size."
            )
        if mask is not None:
            NF._mask_view(input, mask, self._label())  # the layer's name in a bad mask's message
        buffers = self._buffers
        tracking = buffers["running_mean"] is not None and buffers["running_var"] is not None
        use_batch_stats = self.training or not tracking
        if use_batch_stats and input.numel() > 0 and (
            input.numel() == input.shape[1] if mask is None else self._too_few_valid(input, mask)
        ):
            if not (self.single_sample == "running" and tracking):
                raise ValueError(self._single_sample_message(input, mask))
            use_batch_stats = False  # normalize with the running statistics, leave them as they are
        return tracking, use_batch_stats

    def _single_sample_message(self, input: Tensor, mask: Tensor | None = None) -> str:
        got = f"input of shape {tuple(input.shape)}"
        if mask is not None:
            valid = NF._mask_count(input, mask.unsqueeze(1))
            got += f" with {valid} valid position(s) per channel under its mask of shape {tuple(mask.shape)}"
        return (
            f"{self._label()}: training needs more than one value per channel to compute batch "
            f"statistics, got {got}. Fixes: drop the last partial "
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

    Padded sequences: statistics over the valid positions only, zeros in the padding.

    >>> x = torch.randn(2, 3, 5)                                  # (N, C, L), lengths 5 and 2
    >>> mask = torch.arange(5) < torch.tensor([5, 2])[:, None]   # (N, L), True = valid
    >>> int(torch.count_nonzero(bn(x, mask)[1, :, 2:]))
    0
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
