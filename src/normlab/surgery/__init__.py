"""Model tools for normalization layers: fold, recalibrate, convert, freeze, import, diagnose.

Every tool returns a changed copy and leaves the input model as it was; the ones that replace
modules go through one walker, :func:`replace_modules`.

>>> import torch, normlab.surgery as surgery
>>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).eval()
>>> folded, report = surgery.fold_batchnorm(net)
>>> [type(m).__name__ for m in folded]
['Conv2d', 'Identity', 'ReLU']
"""

from .convert import convert_norm, freeze_bn, unfreeze_bn
from .diagnose import (
    ActivationPercentiles,
    GradNorms,
    Problem,
    StatsGap,
    TrainEvalGap,
    batch_vs_running_gap,
    check_stats,
    stats_problems,
    train_eval_gap,
)
from .importers import batchnorm_from_flax, batchnorm_from_keras
from ..layers.kinds import is_batchnorm
from .fold import FoldedPair, FoldReport, FoldResult, SkippedNorm, fold_batchnorm, fold_weights
from .recalibrate import RecalibrationReport, RecalibrationResult, recalibrate_bn
from .sync import convert_sync_batchnorm
from .walk import find_modules, replace_modules

__all__ = [
    "ActivationPercentiles",
    "FoldReport",
    "FoldResult",
    "FoldedPair",
    "GradNorms",
    "Problem",
    "RecalibrationReport",
    "RecalibrationResult",
    "SkippedNorm",
    "StatsGap",
    "TrainEvalGap",
    "batch_vs_running_gap",
    "batchnorm_from_flax",
    "batchnorm_from_keras",
    "check_stats",
    "convert_norm",
    "convert_sync_batchnorm",
    "find_modules",
    "fold_batchnorm",
    "fold_weights",
    "freeze_bn",
    "is_batchnorm",
    "recalibrate_bn",
    "replace_modules",
    "stats_problems",
    "train_eval_gap",
    "unfreeze_bn",
]
