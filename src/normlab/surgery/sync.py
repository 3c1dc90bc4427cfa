"""Convert a model's batch norms to their synchronized counterparts, keeping their state:
batch norm to :class:`normlab.SyncBatchNorm`, batch renorm to
:class:`~normlab.layers.sync.SyncBatchRenorm`, BatchNormAct to
:class:`~normlab.layers.sync.SyncBatchNormAct`."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..layers.act import _BatchNormActMixin
from ..layers.renorm import _BatchRenormMixin
from ..layers.sync import SyncBatchNorm, SyncBatchNormAct, SyncBatchRenorm
from .fold import _KNOWN_FORWARDS
from .walk import replace_modules

__all__ = ["convert_sync_batchnorm"]

# Options of normlab's batch norms that every synchronized layer shares.
_OPTIONS = ("single_sample", "on_nonfinite", "unbiased", "stable_stats")
# normlab's synchronized layers are kept (torch's SyncBatchNorm is converted: it fails on the CPU).
_SYNCHRONIZED = (SyncBatchNorm, SyncBatchRenorm, SyncBatchNormAct)


def _sync_class(module: nn.Module) -> tuple[type, tuple[str, ...]] | None:
    """The synchronized class that computes what ``module`` computes, and the options it takes
    over; None for a batch norm that has none. Decided by the forward the class runs, so that a
    subclass overriding it (computing something else) is not replaced."""
    if not isinstance(module, nn.modules.batchnorm._BatchNorm) or isinstance(module, _SYNCHRONIZED):
        return None
    forward = type(module).forward
    if forward in _KNOWN_FORWARDS:  # torch's and normlab's batch norms, torch's SyncBatchNorm
        return SyncBatchNorm, _OPTIONS
    if forward is _BatchRenormMixin.forward:
        return SyncBatchRenorm, _OPTIONS + ("r_max", "d_max")
    if forward is _BatchNormActMixin.forward:
        return SyncBatchNormAct, _OPTIONS + ("act", "negative_slope", "alpha", "save")
    return None


def convert_sync_batchnorm(model: nn.Module, process_group: Any | None = None) -> nn.Module:
    """A copy of ``model`` whose batch norms train with statistics over every process of
    ``process_group`` (default: the whole world), with the same parameters, running statistics,
    options, mode and ``requires_grad`` flags:

    ====================================================== =========================================
    in ``model``                                           in the copy
    ====================================================== =========================================
    ``BatchNorm1d/2d/3d`` (torch's, normlab's),            :class:`normlab.SyncBatchNorm`
    ``torch.nn.SyncBatchNorm``
    ``BatchRenorm1d/2d/3d``                                :class:`~normlab.layers.sync.SyncBatchRenorm`
                                                           (same ``r_max``, ``d_max``)
    ``BatchNormAct1d/2d/3d``                               :class:`~normlab.layers.sync.SyncBatchNormAct`
                                                           (same activation, ``save``)
    ====================================================== =========================================

    Unlike ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` the result trains on the CPU (gloo)
    too, a fused activation is kept, and the input model is left as it was. Layers already
    synchronized are left as they are (their process group too).

    Batch norms that have no synchronized counterpart are left as they are, with a warning naming
    them: ``GhostBatchNorm`` normalizes each virtual batch of ``virtual_batch_size`` samples with
    that virtual batch's own statistics, a local notion (which samples form a virtual batch
    depends on how the global batch is split over processes, and its size is chosen to keep the
    statistics noisy), so pooling across processes would change what it computes; its virtual
    batches already see only their own process's samples, as intended. Likewise any other
    ``_BatchNorm`` subclass whose forward normlab does not know.

    >>> import torch, normlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                           normlab.BatchNormAct2d(8, act="leaky_relu"))
    >>> [type(m).__name__ for m in normlab.surgery.convert_sync_batchnorm(net)]
    ['Conv2d', 'SyncBatchNorm', 'SyncBatchNormAct']
    """

    skipped = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, _SYNCHRONIZED)
               and _sync_class(m) is None]
    if skipped:
        warnings.warn(
            f"convert_sync_batchnorm: left {', '.join(skipped)} as they are: normlab has no synchronized "
            f"version of them (ghost batch norm's per-virtual-batch statistics are local to a process; "
            f"a subclass with its own forward computes something normlab does not know), so their "
            f"statistics stay per process.",
            stacklevel=2,
        )

    def pick(name: str, module: nn.Module) -> bool:
        return _sync_class(module) is not None

    def make(name: str, bn: nn.Module) -> nn.Module:
        cls, keys = _sync_class(bn)
        options = {key: getattr(bn, key) for key in keys if hasattr(bn, key)}
        ref = bn.weight if bn.weight is not None else bn.running_mean
        sync = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype, **options,
        )
        sync.load_state_dict(bn.state_dict())
        if bn.affine:
            sync.weight.requires_grad_(bn.weight.requires_grad)
            sync.bias.requires_grad_(bn.bias.requires_grad)
        if getattr(bn, "name", None):
            sync.name = bn.name
        return sync.train(bn.training)

    return replace_modules(model, pick, make)
