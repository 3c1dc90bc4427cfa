"""Convert a model's batch norms to their synchronized counterparts, keeping their state:
batch norm to :class:`normlab.SyncBatchNorm`, batch renorm to
:class:`~normlab.layers.sync.SyncBatchRenorm`, BatchNormAct to
:class:`~normlab.layers.sync.SyncBatchNormAct`."""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from ..layers.kinds import activation_spec, norm_kind
from ..layers.sync import SyncBatchNorm, SyncBatchNormAct, SyncBatchRenorm
from .walk import replace_modules

__all__ = ["convert_sync_batchnorm"]

# Options of normlab's batch norms that every synchronized layer shares.
_OPTIONS = ("single_sample", "on_nonfinite", "unbiased", "stable_stats")


def _sync_class(module: nn.Module) -> tuple[type, dict] | None:
    """The synchronized class that computes what ``module`` computes, and the options it takes
    over; None for a batch norm that has none (or that is synchronized already). Decided by
    :func:`normlab.layers.kinds.norm_kind`, so that a subclass computing something else, or one
    of another library whose training forward normlab cannot see, is not replaced."""
    kind = norm_kind(module)
    if kind is None or kind.family != "batch" or kind.unknown or kind.source == "other":
        return None
    options = {key: getattr(module, key) for key in _OPTIONS if hasattr(module, key)}
    if kind.variant == "renorm":
        return SyncBatchRenorm, {**options, "r_max": module.r_max, "d_max": module.d_max}
    if kind.variant != "plain":  # ghost (per-process by design) or synchronized already
        return None
    if kind.activation is None:
        return SyncBatchNorm, options
    spec = activation_spec(kind.activation)
    return None if spec is None else (SyncBatchNormAct, {**options, **spec, "save": getattr(module, "save", "auto")})


def _is_unsynchronized_batchnorm(module: nn.Module) -> bool:
    kind = norm_kind(module)
    return kind is not None and kind.family == "batch" and kind.variant != "sync"


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
    synchronized are left as they are (their process group too). A batch norm with a weight and no
    bias (``bias=False``) stays so.

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
               if _is_unsynchronized_batchnorm(m) and _sync_class(m) is None]
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
        cls, options = _sync_class(bn)
        ref = bn.weight if bn.weight is not None else bn.running_mean
        sync = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats, process_group,
            device=None if ref is None else ref.device, dtype=None if ref is None else ref.dtype,
            bias=bn.bias is not None or bn.weight is None, **options,
        )
        sync.load_state_dict(bn.state_dict())
        for name in ("weight", "bias"):
            if getattr(bn, name) is not None:
                getattr(sync, name).requires_grad_(getattr(bn, name).requires_grad)
        if getattr(bn, "name", None):
            sync.name = bn.name
        return sync.train(bn.training)

    return replace_modules(model, pick, make)
