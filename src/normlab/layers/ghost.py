"""Ghost batch normalization (Hoffer, Hubara & Soudry 2017): GhostBatchNorm1d/2d/3d.

Large-batch training generalizes worse, partly because batch norm's statistics over a large
batch add less noise. Ghost batch norm keeps the small-batch statistics: in training each batch
is cut along dimension 0 into *virtual batches* of ``virtual_batch_size`` consecutive samples,
and each is batch-normalized with its own mean and variance::

    y[v] = gamma * (x[v] - mean(x[v])) / sqrt(var(x[v]) + eps) + beta      for each virtual batch v

The last virtual batch holds the rest and may be smaller; a rest of a single sample joins the
virtual batch before it (one sample gives no batch statistics); a batch of at most
``virtual_batch_size`` samples is one virtual batch (plain batch norm). See
:func:`normlab.functional.ghost_batch_sizes`.

Running statistics: one update per virtual batch, in order, with torch's ``momentum`` rule, as
in the paper's Algorithm 1. The layer's state after a training step is then exactly that of a
``BatchNorm`` applied virtual batch by virtual batch, and ``num_batches_tracked`` counts virtual
batches (so ``momentum=None`` averages every virtual batch with equal weight). Each virtual
batch's statistics estimate those the model sees, and the small-batch variance noise is what
the running variance should average; one update from the whole batch would instead estimate the
large-batch statistics that ghost batch norm avoids. The per-step momentum is
``1 - (1 - momentum) ** G`` for G virtual batches: with many, consider a smaller ``momentum``.
A step in which any virtual batch has non-finite statistics leaves the running statistics and
the count unchanged (handled as ``on_nonfinite`` says).

Because the updates go virtual batch by virtual batch, gradient accumulation changes nothing:
inside ``normlab.accumulate`` micro-batches whose size is a multiple of ``virtual_batch_size``
make the same virtual batches, and the same updates, as the full batch.

Inference (eval mode with running statistics) is batch norm with the running statistics, and
the state dict is a torch ``BatchNorm`` state dict. Without running statistics
(``track_running_stats=False``) the layer always normalizes by virtual batches.

Speed: torch's batch-norm kernels run once per virtual batch; the forward writes each slice of
one output in place, the backward copies each slice of the input gradient into place (see
``benchmarks/bench_variants.py``).
"""

from __future__ import annotations

from torch import Tensor, nn

from .. import functional as NF
from .batch import _BatchNormMixin

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNormMixin(_BatchNormMixin):
    """What GhostBatchNorm1d/2d/3d add to batch norm (they differ only in the input check):
    ``virtual_batch_size`` and :func:`normlab.functional.ghost_batch_norm`."""

    _functional = staticmethod(NF.ghost_batch_norm)
    # Inside normlab.accumulate the updates still go virtual batch by virtual batch: that is
    # already what the full batch would do (see the module docstring), so nothing is pooled.
    _pools = False

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
        virtual_batch_size: int = 32,
        **options,
    ) -> None:
        NF.ghost_batch_sizes(0, virtual_batch_size, name=type(self).__name__)  # checks it, at construction
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.virtual_batch_size = virtual_batch_size

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if mask is not None:
            raise TypeError(
                f"{self._label()}: ghost batch norm takes no mask (its virtual batches are fixed slices of "
                f"rows, which padding would unbalance); use normlab.BatchNorm{self._dim_name()}(..., mask=mask), "
                f"or drop the padded rows before the layer."
            )
        return self._batch_norm_forward(input)

    def _dim_name(self) -> str:
        return type(self).__name__[-2:]

    def _variant_options(self, update: bool) -> dict:
        return {"virtual_batch_size": self.virtual_batch_size}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"


class GhostBatchNorm1d(_GhostBatchNormMixin, nn.BatchNorm1d):
    """Ghost batch norm over ``(N, C)`` or ``(N, C, L)`` input (Hoffer et al. 2017).

    Training: batch norm of each virtual batch of ``virtual_batch_size`` consecutive samples with
    its own statistics, one running-statistics update per virtual batch (see
    :mod:`normlab.layers.ghost`). Eval: batch norm with the running statistics.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype: as
            :class:`normlab.BatchNorm1d` (torch's); ``momentum`` applies per virtual batch.
        virtual_batch_size: samples per virtual batch, an int >= 2 (default 32; Hoffer et al.
            used 128 within batches of 4096).
        bias, single_sample, on_nonfinite, unbiased, stable_stats (keyword-only): as
            :class:`normlab.BatchNorm1d`.

    >>> import torch
    >>> from normlab.layers.ghost import GhostBatchNorm1d
    >>> layer = GhostBatchNorm1d(3, virtual_batch_size=4)
    >>> y = layer(torch.randn(10, 3))        # virtual batches of 4, 4 and 2 samples
    >>> int(layer.num_batches_tracked)
    3
    """


class GhostBatchNorm2d(_GhostBatchNormMixin, nn.BatchNorm2d):
    """Ghost batch norm over ``(N, C, H, W)`` input; arguments as :class:`GhostBatchNorm1d`.

    >>> import torch
    >>> from normlab.layers.ghost import GhostBatchNorm2d
    >>> layer = GhostBatchNorm2d(64, virtual_batch_size=16)
    >>> layer.load_state_dict(torch.nn.BatchNorm2d(64).state_dict())
    <All keys matched successfully>
    """


class GhostBatchNorm3d(_GhostBatchNormMixin, nn.BatchNorm3d):
    """Ghost batch norm over ``(N, C, D, H, W)`` input; arguments as :class:`GhostBatchNorm1d`."""
