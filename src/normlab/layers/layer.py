"""Layer and RMS normalization over the trailing dimensions: drop-in for ``torch.nn.LayerNorm``/``RMSNorm``."""

from __future__ import annotations

import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import functional as NF
from ..checks import check_normalized_shape, check_tensor
from .base import NormLayer, check_eps

__all__ = ["LayerNorm", "RMSNorm"]


class LayerNorm(NormLayer, nn.LayerNorm):
    """Layer normalization over the last ``len(normalized_shape)`` dimensions; drop-in for ``torch.nn.LayerNorm``.

    ``y = (x - E[x]) / sqrt(Var[x] + eps) * weight + bias`` with statistics per leading index
    (per sample and position), so the output never depends on the rest of the batch (Ba et al.
    2016). float16/bfloat16 input is normalized with float32 statistics.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dimension).
        eps: added to the variance (default 1e-5).
        elementwise_affine: learn ``weight`` (init 1) and, if ``bias``, ``bias`` (init 0).

    >>> import torch, normlab
    >>> normlab.LayerNorm(8)(torch.randn(4, 8)).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        check_eps(type(self).__name__, eps)
        check_normalized_shape(_shape(normalized_shape), type(self).__name__)
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(input, self._label())
        return NF.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(NormLayer, nn.Module):
    """Root-mean-square normalization over the trailing dimensions; drop-in for ``torch.nn.RMSNorm``.

    ``y = x / sqrt(mean(x^2) + eps) * weight`` (Zhang & Sennrich 2019): no centering, no bias.

    Args:
        normalized_shape: the trailing shape to normalize over (an int for the last dimension).
        eps: added to the mean square; None (default) means ``torch.finfo(x.dtype).eps`` as torch.
        elementwise_affine: learn ``weight`` (init 1).

    >>> import torch, normlab
    >>> normlab.RMSNorm(8)(torch.randn(4, 8)).shape
    torch.Size([4, 8])
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float | None = None,
        elementwise_affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if eps is not None:
            check_eps(type(self).__name__, eps)
        self.normalized_shape = _shape(normalized_shape)
        check_normalized_shape(self.normalized_shape, type(self).__name__)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(input, self._label())
        return NF.rms_norm(input, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


def _shape(normalized_shape: int | Sequence[int]) -> tuple:
    """``normalized_shape`` as a tuple (an int is the last dimension's size), as torch reads it."""
    if isinstance(normalized_shape, numbers.Integral):
        return (int(normalized_shape),)
    return tuple(normalized_shape)
