"""Stand-ins for other libraries' norm layers, written from their documented behaviour.

timm cannot be installed beside the CPU build of torch these machines use (it imports
torchvision, whose PyPI wheels fail to load beside that build), and torchvision neither, so the
model tools are tested against these faithful local versions of their layers:

* ``TimmBatchNormAct2d``: timm's ``BatchNormAct2d``, a ``torch.nn.BatchNorm2d`` subclass with its
  own forward (``F.batch_norm`` as torch's, then ``self.drop``, then ``self.act``) and the two
  child modules ``drop`` and ``act``.
* ``TimmGroupNormAct``: timm's ``GroupNormAct``, ``F.group_norm`` then ``drop`` and ``act``.
* ``TorchvisionFrozenBatchNorm2d``: torchvision's ``ops.misc.FrozenBatchNorm2d``, a plain module
  with buffers ``weight``, ``bias``, ``running_mean``, ``running_var`` and an ``eps`` attribute,
  computing ``x * scale + (bias - running_mean * scale)`` in both modes.
* ``TimmFrozenBatchNormAct2d``: timm's ``FrozenBatchNormAct2d``, the same with ``drop`` and ``act``.
* ``LyingBatchNorm2d``: a BatchNorm2d subclass with an ``act`` whose forward computes something
  else (it doubles the normalized output): what no tool may take for batch norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TimmBatchNormAct2d(nn.BatchNorm2d):
    def __init__(self, num_features: int, act_layer=nn.ReLU, drop_layer=None, **kw):
        super().__init__(num_features, **kw)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x):
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        else:
            factor = 0.0 if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                         self.weight, self.bias, use_batch, factor, self.eps)
        return self.act(self.drop(x))


class TimmGroupNormAct(nn.GroupNorm):
    def __init__(self, num_channels: int, num_groups: int = 2, act_layer=nn.ReLU, **kw):
        super().__init__(num_groups, num_channels, **kw)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)))


class TorchvisionFrozenBatchNorm2d(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args):
        state_dict.pop(prefix + "num_batches_tracked", None)  # torchvision drops the count
        super()._load_from_state_dict(state_dict, prefix, *args)

    def _affine(self, x):
        w, b = self.weight.reshape(1, -1, 1, 1), self.bias.reshape(1, -1, 1, 1)
        rv, rm = self.running_var.reshape(1, -1, 1, 1), self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)

    def forward(self, x):
        return self._affine(x)


class TimmFrozenBatchNormAct2d(TorchvisionFrozenBatchNorm2d):
    def __init__(self, num_features: int, eps: float = 1e-5, act_layer=nn.ReLU):
        super().__init__(num_features, eps)
        self.drop = nn.Identity()
        self.act = act_layer()

    def forward(self, x):
        return self.act(self.drop(self._affine(x)))


class LyingBatchNorm2d(TimmBatchNormAct2d):
    def forward(self, x):
        return 2 * super().forward(x)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x):
        s = self.conv_expand(self.act(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(s)


class InvertedResidual(nn.Module):
    """An EfficientNet block as timm builds it: 1x1 expand, depthwise 3x3, squeeze-excite, 1x1
    project, each conv followed by a BatchNormAct2d (SiLU, or none after the projection)."""

    def __init__(self, channels: int, expand: int = 4, act=nn.SiLU):
        super().__init__()
        mid = channels * expand
        self.conv_pw = nn.Conv2d(channels, mid, 1, bias=False)
        self.bn1 = TimmBatchNormAct2d(mid, act_layer=act)
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.bn2 = TimmBatchNormAct2d(mid, act_layer=act)
        self.se = SqueezeExcite(mid, max(1, channels // 4))
        self.conv_pwl = nn.Conv2d(mid, channels, 1, bias=False)
        self.bn3 = TimmBatchNormAct2d(channels, act_layer=None)

    def forward(self, x):
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        return x + self.bn3(self.conv_pwl(self.se(y)))


class TinyEfficientNet(nn.Module):
    """timm's efficientnet layout in miniature: stem conv + BatchNormAct2d(SiLU), blocks, head
    conv + BatchNormAct2d(SiLU), and one plain torch BatchNorm2d and one Hardswish norm-act
    (MobileNetV3's activation), so that every kind of batch norm of such models is present."""

    def __init__(self, width: int = 8, classes: int = 5):
        super().__init__()
        self.conv_stem = nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False)
        self.bn1 = TimmBatchNormAct2d(width, act_layer=nn.SiLU)
        self.blocks = nn.Sequential(InvertedResidual(width), InvertedResidual(width, act=nn.Hardswish))
        self.conv_head = nn.Conv2d(width, 2 * width, 1, bias=False)
        self.bn2 = TimmBatchNormAct2d(2 * width, act_layer=nn.SiLU)
        self.plain = nn.BatchNorm2d(2 * width)
        self.classifier = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        x = self.plain(self.bn2(self.conv_head(self.blocks(x))))
        return self.classifier(x.mean((2, 3)))
