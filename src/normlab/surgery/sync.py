"""Convert a model's batch norms to :class:`normlab.SyncBatchNorm`, keeping their state."""

from __future__ import annotations

from typing import Any

import warnings

from torch import nn

from ..layers.sync import SyncBatchNorm
from .fold import _KNOWN_FORWARDS
from .walk import replace_modules

__all__ = ["convert_sync_batchnorm"]

# Options of normlab's batch norms that SyncBatchNorm shares.
_OPTIONS = ("single_sample", "on_nonfinite", "unbiased", "stable_stats")


def _trains_like_batch_norm(module: nn.Module) -> bool:
    # Batch renorm, ghost batch norm or a norm fused with an activation train differently:
    # a SyncBatchNorm in their place would change what the model computes.
    return type(module).forward in _KNOWN_FORWARDS


def convert_sync_batchnorm(model: nn.Module, process_group: Any | None = None) -> nn.Module:
    """A copy of ``model`` whose ``BatchNorm1d/2d/3d`` (torch's or normlab's, and torch's
    ``SyncBatchNorm``) are :class:`normlab.SyncBatchNorm` with the same parameters, running
    statistics, options, mode and ``requires_grad`` flags. Unlike
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` the result trains on the CPU (gloo) too,
    and the input model is left as it was. Batch norms that train differently (batch renorm,
    ghost batch norm, BatchNormAct) are left as they are, with a warning naming them.

    >>> import torch, normlab
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> type(normlab.surgery.convert_sync_batchnorm(net)[1]).__name__
    'SyncBatchNorm'
    """

    skipped = [f"'{name}' ({type(m).__name__})" for name, m in model.named_modules()
               if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (nn.SyncBatchNorm, SyncBatchNorm))
               and not _trains_like_batch_norm(m)]
    if skipped:
        warnings.warn(
            f"convert_sync_batchnorm: left {', '.join(skipped)} as they are: they train differently from "
            f"batch norm (renorm, ghost batches or a fused activation), so their statistics stay per process.",
            stacklevel=2,
        )

    def pick(name: str, module: nn.Module) -> bool:
        return (isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, SyncBatchNorm)
                and _trains_like_batch_norm(module))

    def make(name: str, bn: nn.Module) -> nn.Module:
        options = {key: getattr(bn, key) for key in _OPTIONS if hasattr(bn, key)}
        ref = bn.weight if bn.weight is not None else bn.running_mean
        sync = SyncBatchNorm(
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
