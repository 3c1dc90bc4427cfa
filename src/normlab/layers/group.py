"""Group and instance normalization: drop-in for ``torch.nn.GroupNorm`` and ``InstanceNorm1d/2d/3d``.

Both compute statistics per sample, so they do not depend on the rest of the batch (Wu & He
2018; Ulyanov et al. 2016). Instance norm is group norm with one channel per group, plus
torch's optional running statistics.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .. import functional as NF
from ..checks import check_tensor
from .base import (
    NormLayer,
    RunningStatsLayer,
    bias_repr,
    check_eps,
    check_momentum,
    check_positive_int,
    drop_bias,
    reset_affine,
)

__all__ = ["GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class GroupNorm(NormLayer, nn.GroupNorm):
    """Group normalization over ``(N, C, *)`` input; drop-in for ``torch.nn.GroupNorm``.

    The C channels split into ``num_groups`` contiguous groups; each sample and group is
    standardized over its channels and positions, then ``weight[c]``, ``bias[c]`` apply:
    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias``. ``num_groups=1`` is layer norm over
    ``(C, *)``; ``num_groups=C`` is instance norm. float16/bfloat16 input is normalized with
    float32 statistics.

    Args:
        num_groups: groups; must divide num_channels.
        num_channels: C.
        eps: added to the variance (default 1e-5).
        affine: learn per-channel ``weight`` (init 1) and ``bias`` (init 0).
        bias: keyword-only, default True; False keeps the ``weight`` alone (no ``bias`` key in
            the state dict), as torch 2.13's ``bias=False``, on every torch version.

    >>> import torch, normlab
    >>> normlab.GroupNorm(2, 4)(torch.randn(3, 4, 5, 5)).shape
    torch.Size([3, 4, 5, 5])
    >>> normlab.GroupNorm(2, 4, bias=False).state_dict().keys()
    odict_keys(['weight'])
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_groups", num_groups)
        check_positive_int(owner, "num_channels", num_channels)
        check_eps(owner, eps)
        if num_channels % num_groups:
            divisors = [d for d in range(1, num_channels + 1) if num_channels % d == 0]
            raise ValueError(
                f"{owner}: num_channels={num_channels} must be divisible by num_groups={num_groups}; "
                f"valid num_groups are {divisors}."
            )
        super().__init__(num_groups, num_channels, eps, affine, device, dtype)
        drop_bias(self, bias)

    def reset_parameters(self) -> None:
        reset_affine(self)

    def extra_repr(self) -> str:
        return bias_repr(self, super().extra_repr())

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(input, self._label())
        if input.dim() < 2 or input.shape[1] != self.num_channels:
            raise ValueError(
                f"{self._label()}: expected input (N, {self.num_channels}, *), got shape "
                f"{tuple(input.shape)}."
            )
        return NF.group_norm(input, self.num_groups, self.weight, self.bias, self.eps, name=self._label())


class _InstanceNormMixin(RunningStatsLayer):
    """Forward and options shared by InstanceNorm1d/2d/3d."""

    _updates_captured_stats = True  # as torch's instance norm (see RunningStatsLayer)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        on_nonfinite: Literal["warn", "skip", "raise"] = "warn",
    ) -> None:
        owner = type(self).__name__
        check_positive_int(owner, "num_features", num_features)
        check_eps(owner, eps)
        check_momentum(owner, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        drop_bias(self, bias)
        self._init_options(on_nonfinite, dtype)

    def extra_repr(self) -> str:
        return bias_repr(self, super().extra_repr())

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(input, self._label())
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        x = input.unsqueeze(0) if unbatched else input
        if x.shape[1] != self.num_features:
            # torch only warns when the layer has no per-channel state (affine=False, no running
            # statistics); a num_features that disagrees with the input is a bug either way.
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension "
                f"{0 if unbatched else 1}, got input of shape {tuple(input.shape)}; build the layer with "
                f"num_features={x.shape[1]}."
            )
        tracking = self.running_mean is not None and self.running_var is not None
        result = NF.instance_norm(
            x,
            self.running_mean if tracking else None,
            self.running_var if tracking else None,
            self.weight,
            self.bias,
            use_input_stats=self.training or not self.track_running_stats,
            # torch's instance norm reads momentum=None as "never update"; keep that meaning.
            momentum=self.momentum if self.momentum is not None else 0.0,
            eps=self.eps,
        )
        if result.updated is not None:
            self._store_stats(result.running_mean, result.running_var, result.updated)
        return result.output.squeeze(0) if unbatched else result.output


class InstanceNorm1d(_InstanceNormMixin, nn.InstanceNorm1d):
    """Instance norm over ``(N, C, L)`` or unbatched ``(C, L)``; drop-in for ``torch.nn.InstanceNorm1d``.

    ``y[n, c] = (x[n, c] - E[x[n, c]]) / sqrt(Var[x[n, c]] + eps) * weight[c] + bias[c]``.
    torch's defaults: ``affine=False``, ``track_running_stats=False``; with running statistics
    the eval-mode output uses them, and they move towards the batch average of the
    per-instance statistics.
    ``bias=False`` (keyword-only) keeps the ``weight`` alone (with ``affine``), as torch 2.13's,
    on every torch version.

    >>> import torch, normlab
    >>> normlab.InstanceNorm1d(3)(torch.randn(2, 3, 10)).shape
    torch.Size([2, 3, 10])
    """


class InstanceNorm2d(_InstanceNormMixin, nn.InstanceNorm2d):
    """Instance norm over ``(N, C, H, W)`` or ``(C, H, W)``; drop-in for ``torch.nn.InstanceNorm2d``."""


class InstanceNorm3d(_InstanceNormMixin, nn.InstanceNorm3d):
    """Instance norm over ``(N, C, D, H, W)`` or ``(C, D, H, W)``; drop-in for ``torch.nn.InstanceNorm3d``."""
