"""Frozen batch norm: batch norm's inference formula as a fixed per-channel affine map.

A detection backbone fine-tuned with a few images per GPU cannot estimate batch statistics, so
its batch norms are frozen: statistics *and* affine parameters become constants (buffers, not
parameters), and the layer computes, in training and in eval alike::

    scale = weight / sqrt(running_var + eps)          per channel, shape (C,)
    shift = bias - running_mean * scale
    y     = x * scale + shift

which is ``torch.nn.BatchNorm*d`` in eval mode. The forward is one ``addcmul``: autograd keeps
only the ``(C,)`` scale for the input's gradient, never the input itself, unlike
``torch.batch_norm``'s backward. Buffers carry torch's key names (``weight``, ``bias``,
``running_mean``, ``running_var``, ``num_batches_tracked``), so a batch norm's state dict loads
with ``strict=True`` (version-1 checkpoints without ``num_batches_tracked`` too), and
:meth:`from_batchnorm` converts a live layer. Running statistics stay float32 under
``model.half()``; 16-bit input is transformed in float32 and returned in its dtype; integer
input (a uint8 image) gives a floating result in the statistics' dtype, as torchvision's
``FrozenBatchNorm2d`` does.

A batch norm with a weight and no bias (torch's ``bias=False``) freezes to a frozen norm with
``bias=False``: a ``weight`` buffer and no ``bias`` key, so its state dict still loads with
``strict=True`` both ways, and :func:`normlab.surgery.unfreeze_bn` gives the layer back as it
was. The default (``bias=True``) keeps both buffers, as torchvision's ``FrozenBatchNorm2d``
always does.

``FrozenBatchNormAct1d/2d/3d`` add an activation module after the affine map, ``y = act(x *
scale + shift)``: the frozen form of a batch norm fused with an activation (normlab's
``BatchNormAct2d``, timm's ``BatchNormAct2d``), which :func:`normlab.surgery.freeze_bn` gives.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..stats import statistics_dtype
from ..checks import check_tensor
from .base import NormLayer, check_bias, check_eps, check_momentum, check_positive_int

__all__ = [
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
]

class _FrozenBatchNorm(NormLayer, nn.Module):
    """The state and forward shared by FrozenBatchNorm1d/2d/3d (they differ in the input check)."""

    _version = 2  # torch's batch-norm state-dict version: num_batches_tracked present
    _ranks: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        momentum: float | None = 0.1,
    ) -> None:
        owner = type(self).__name__
        check_bias(owner, bias)
        check_positive_int(owner, "num_features", num_features)
        check_eps(owner, eps)
        check_momentum(owner, momentum)
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.affine = bool(affine)
        # Not used by the frozen layer: kept so that unfreeze_bn gives back the original layer.
        self.momentum = momentum
        factory = {"device": device, "dtype": dtype}
        if self.affine:
            self.register_buffer("weight", torch.ones(num_features, **factory))
            self.register_buffer("bias", torch.zeros(num_features, **factory) if bias else None)
        else:
            self.register_buffer("weight", None)
            self.register_buffer("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self._keep_stats_float32()
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self._none_buffers_last()

    @classmethod
    def from_batchnorm(cls, bn: nn.Module, **kw) -> _FrozenBatchNorm:
        """A frozen copy of a batch norm (torch's or normlab's): same buffers, eps and momentum.

        The class is the one of ``bn``'s rank when called on the base (``FrozenBatchNorm2d`` for
        a ``BatchNorm2d``); the layer's mode is kept (it does not matter to the forward).

        >>> import torch, normlab
        >>> from normlab.layers.frozen import FrozenBatchNorm2d
        >>> bn = torch.nn.BatchNorm2d(4).eval()
        >>> x = torch.randn(2, 4, 3, 3)
        >>> torch.allclose(FrozenBatchNorm2d.from_batchnorm(bn)(x), bn(x), atol=1e-6)
        True
        """
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise TypeError(
                f"{cls.__name__}.from_batchnorm: expected a batch-norm layer (torch.nn.BatchNorm1d/2d/3d "
                f"or normlab's), got {type(bn).__name__}."
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: the layer {bn!r} has no running statistics "
                f"(track_running_stats=False), so there is nothing to freeze; it normalizes with batch "
                f"statistics in eval too. Train it with track_running_stats=True or recalibrate first."
            )
        target = _rank_class(bn, act="act" in kw) if cls in (_FrozenBatchNorm, _FrozenBatchNormAct) else cls
        ref = bn.weight if bn.weight is not None else bn.running_mean
        frozen = target(
            bn.num_features, bn.eps, bn.weight is not None, device=ref.device, dtype=ref.dtype,
            bias=bn.bias is not None or bn.weight is None, momentum=bn.momentum, **kw,
        )
        with torch.no_grad():
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
            frozen.running_mean = bn.running_mean.detach().clone()
            frozen.running_var = bn.running_var.detach().clone()
            if bn.num_batches_tracked is not None:
                frozen.num_batches_tracked.copy_(bn.num_batches_tracked)
        return frozen.train(bn.training)

    def scale_shift(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """``(scale, shift)`` of shape ``(C,)``: ``y = x * scale + shift`` (float32 for 16-bit state)."""
        mean, var = self.running_mean, self.running_var
        acc = dtype or statistics_dtype(mean.dtype)
        scale = torch.rsqrt(var.to(acc) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(acc)
        shift = -mean.to(acc) * scale
        if self.bias is not None:
            shift = shift + self.bias.to(acc)
        return scale, shift

    def forward(self, input: Tensor) -> Tensor:
        check_tensor(input, self._label(), integers=True)
        if input.dim() not in self._ranks:
            expected = " or ".join(f"{r}D" for r in self._ranks)
            raise ValueError(f"{self._label()}: expected {expected} input (got {input.dim()}D input).")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{self._label()}: expected {self.num_features} channels in dimension 1, got input "
                f"of shape {tuple(input.shape)}; check the preceding layer's output size."
            )
        if not (input.is_floating_point() or input.is_complex()):
            # An integer image: the affine map of its values, in the statistics' dtype (casting the
            # result back to an integer type would round it to zeros).
            input = input.to(self.running_mean.dtype)
        scale, shift = self.scale_shift(statistics_dtype(input.dtype))
        view = (1, -1) + (1,) * (input.dim() - 2)
        # One fused kernel; autograd saves the (C,) scale for dx and the input only when the
        # weight itself requires a gradient (torch.func users differentiating through buffers).
        out = torch.addcmul(shift.view(view), input, scale.view(view))
        return out if out.dtype == input.dtype else out.to(input.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and key not in state_dict:
            # A version-1 batch-norm checkpoint: keep this layer's count, as torch does.
            state_dict[key] = self.num_batches_tracked
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        no_bias = ", bias=False" if self.weight is not None and self.bias is None else ""
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}{no_bias}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C)`` or ``(N, C, L)``: ``y = x * scale + shift`` with constants.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``: the
    eval-mode output of ``BatchNorm1d`` in both modes; nothing is learned or updated.

    Args:
        num_features: C.
        eps: added to the variance (default 1e-5).
        affine: keep ``weight`` (γ) and ``bias`` (β) buffers (False: 1 and 0, no keys).
        bias: keyword-only, default True; False keeps the ``weight`` buffer alone (β = 0, no
            ``bias`` key): the frozen form of a batch norm built with ``bias=False``.
        momentum: stored only, for :func:`normlab.surgery.unfreeze_bn` (default 0.1).

    >>> import torch
    >>> from normlab.layers.frozen import FrozenBatchNorm1d
    >>> bn = torch.nn.BatchNorm1d(3)
    >>> frozen = FrozenBatchNorm1d(3)
    >>> frozen.load_state_dict(bn.state_dict())
    <All keys matched successfully>
    >>> frozen(torch.tensor([[1.0, 2.0, 3.0]]))
    tensor([[1.0000, 2.0000, 3.0000]])
    """

    _ranks = (2, 3)


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C, H, W)``; arguments and formula as :class:`FrozenBatchNorm1d`.

    >>> import torch
    >>> from normlab.layers.frozen import FrozenBatchNorm2d
    >>> FrozenBatchNorm2d(8)(torch.randn(2, 8, 4, 4)).shape
    torch.Size([2, 8, 4, 4])
    """

    _ranks = (4,)


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """Frozen batch norm over ``(N, C, D, H, W)``; arguments and formula as :class:`FrozenBatchNorm1d`."""

    _ranks = (5,)


def _rank_class(bn: nn.Module, act: bool = False) -> type[_FrozenBatchNorm]:
    ranked = (FrozenBatchNormAct1d, FrozenBatchNormAct2d, FrozenBatchNormAct3d) if act else (
        FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d)
    if isinstance(bn, nn.BatchNorm1d):
        return ranked[0]
    if isinstance(bn, nn.BatchNorm3d):
        return ranked[2]
    # BatchNorm2d, and SyncBatchNorm (any rank) whose most common use is 2-D.
    return ranked[1]


class _FrozenBatchNormAct(_FrozenBatchNorm):
    """A frozen batch norm followed by an activation module: ``act(x * scale + shift)``."""

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None, *,
                 bias: bool = True, momentum: float | None = 0.1, act: nn.Module | None = None) -> None:
        if act is not None and not isinstance(act, nn.Module):
            raise TypeError(
                f"{type(self).__name__}: act must be a torch.nn.Module (e.g. torch.nn.SiLU()) or None, "
                f"got {type(act).__name__} {act!r}."
            )
        super().__init__(num_features, eps, affine, device, dtype, bias=bias, momentum=momentum)
        # A child module, as in timm's FrozenBatchNormAct2d: an activation with parameters (PReLU)
        # keeps them under the key 'act.*'.
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:
        return self.act(super().forward(input))


_ACT_DOC = """Frozen batch norm over {shape} followed by an activation module: ``y = act(x * scale + shift)``.

    Arguments as :class:`FrozenBatchNorm1d`, and ``act``: the activation module (default
    ``nn.Identity()``), a child module of the layer.

    >>> import torch
    >>> from normlab.layers.frozen import {name}
    >>> layer = {name}(3, act=torch.nn.ReLU())
    >>> bool((layer(torch.randn({example})) >= 0).all())
    True
    """


class FrozenBatchNormAct1d(_FrozenBatchNormAct, FrozenBatchNorm1d):
    __doc__ = _ACT_DOC.format(shape="``(N, C)`` or ``(N, C, L)``", name="FrozenBatchNormAct1d", example="4, 3")


class FrozenBatchNormAct2d(_FrozenBatchNormAct, FrozenBatchNorm2d):
    __doc__ = _ACT_DOC.format(shape="``(N, C, H, W)``", name="FrozenBatchNormAct2d", example="2, 3, 4, 4")


class FrozenBatchNormAct3d(_FrozenBatchNormAct, FrozenBatchNorm3d):
    __doc__ = _ACT_DOC.format(shape="``(N, C, D, H, W)``", name="FrozenBatchNormAct3d", example="2, 3, 2, 2, 2")
