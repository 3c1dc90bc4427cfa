"""normlab's normalization layers (``torch.nn`` modules); every one is exported at top level."""

from .base import NonFiniteStatisticsWarning, name_layers
from .batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .group import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer import LayerNorm, RMSNorm
from .registry import get_norm, norm_names, register_norm
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "NonFiniteStatisticsWarning",
    "RMSNorm",
    "SyncBatchNorm",
    "get_norm",
    "name_layers",
    "norm_names",
    "register_norm",
]
