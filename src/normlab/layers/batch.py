"""Batch normalization layers: drop-in ``torch.nn.BatchNorm1d/2d/3d`` with better edges.

Same constructor arguments, defaults, attributes, state-dict keys and numbers as torch, plus:

* ``bias`` (keyword-only): False keeps ``weight`` and no ``bias`` (scale without shift; no
  ``bias`` key in the state dict), as torch 2.13's ``bias=False``, on every supported torch
  version; every batch-norm variant (renorm, ghost, norm-act, synchronized, frozen) takes it.
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

from torch import Tensor, nn

from .base import BatchNormLayer

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


class _BatchNormMixin(BatchNormLayer):
    """The forward shared by BatchNorm1d/2d/3d (they differ only in the input check): the
    template's, with a mask."""

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (``(N, C, *)``); ``mask`` (bool, True at valid positions, the
        input's shape without dimension 1) restricts the statistics to the valid positions and
        zeros the padded ones (see :mod:`normlab.layers.batch`)."""
        return self._batch_norm_forward(input, mask)


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
        bias: keyword-only, default True; False learns ``weight`` alone (with ``affine``).
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

    A weight without a bias: torch 2.13's keys, strict loading both ways.

    >>> list(normlab.BatchNorm1d(3, bias=False).state_dict())
    ['weight', 'running_mean', 'running_var', 'num_batches_tracked']
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
