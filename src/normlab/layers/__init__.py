"""normlab's normalization layers (``torch.nn`` modules); every one is exported at top level."""

from .act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .base import NonFiniteStatisticsWarning, name_layers
from .batch import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import (
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .kinds import NormKind, norm_kind
from .group import GroupNorm, InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .layer import LayerNorm, RMSNorm
from .lazy import (
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
    LazyInstanceNorm1d,
    LazyInstanceNorm2d,
    LazyInstanceNorm3d,
)
from .recurrent import BNLSTM, LNLSTM, RecurrentBatchNorm
from .renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, LinearRamp, renorm_schedule
from .registry import get_norm, norm_names, register_norm
from .sync import SyncBatchNorm, SyncBatchNormAct, SyncBatchRenorm

__all__ = [
    "BNLSTM",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LNLSTM",
    "LinearRamp",
    "LayerNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
    "NonFiniteStatisticsWarning",
    "NormKind",
    "RMSNorm",
    "RecurrentBatchNorm",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "SyncBatchRenorm",
    "get_norm",
    "name_layers",
    "norm_kind",
    "norm_names",
    "register_norm",
    "renorm_schedule",
]
