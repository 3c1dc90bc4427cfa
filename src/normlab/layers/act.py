"""Batch norm fused with an activation that keeps only what backward needs: ``BatchNormAct1d/2d/3d``.

``y = act(z)``, ``z = gamma * x_hat + beta``, ``x_hat = (x - mean) / sqrt(var + eps)``, for
``act`` one of ``"identity"``, ``"relu"``, ``"leaky_relu"`` (``negative_slope``), ``"elu"``
(``alpha``) and ``"silu"``. Statistics, running-statistics updates, options and state dict are
those of :class:`normlab.BatchNorm2d` (a BatchNormAct *is* a normlab/torch batch norm), so a
batch-norm checkpoint loads with ``strict=True`` and the numbers are batch norm's followed by
the activation. The math is :func:`normlab.functional.batch_norm_act`; its module
(:mod:`normlab.functional.act`) tabulates what each activation keeps between forward and
backward: one tensor of the input's size for identity, leaky_relu and elu (torch's batch norm
+ activation: two for identity, three for the others), two for silu and relu.

Second-order gradients (``create_graph=True``) are supported on every path. As
:class:`normlab.BatchNorm2d`: ``forward(input, mask=None)`` takes a mask of valid positions (that
call runs unfused: batch norm's masked path, then the activation, which keeps padded zeros at
0); inside :func:`normlab.accumulate` the running statistics pool the micro-batches (fused
still); under ``torch.utils.checkpoint`` a recomputed forward leaves them alone. Inside
``torch.func`` transforms and ``torch.compile`` the layer runs unfused too, with the same numbers
and torch's memory use.

Like timm's ``BatchNormAct2d``, the class subclasses ``torch.nn.BatchNorm2d``: code that treats
batch norms specially (weight-decay groups, recalibration, putting them in eval mode) sees one.
A tool that *replaces* batch norms by type drops the activation (torch's
``SyncBatchNorm.convert_sync_batchnorm`` does); :func:`normlab.surgery.fold.fold_batchnorm`
checks the eval formula and leaves a BatchNormAct with an activation alone.
:meth:`split <_BatchNormActMixin.split>` gives the plain batch norm and the activation module,
for tools that need them apart.
"""

from __future__ import annotations

from torch import nn

from .. import functional as NF
from ..functional.act import ACTIVATIONS, ActName, Activation, SaveMode, activation, check_save
from .base import BatchNormLayer
from .batch import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["ACTIVATIONS", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]


class _BatchNormActMixin(BatchNormLayer):
    """What BatchNormAct1d/2d/3d add to batch norm: the activation's options and
    :func:`normlab.functional.batch_norm_act`."""

    _functional = staticmethod(NF.batch_norm_act)
    _plain_class: type  # the normlab batch norm of the same rank (for split)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        act: ActName = "relu",
        negative_slope: float = 0.01,
        alpha: float = 1.0,
        save: SaveMode = "auto",
        **options,
    ) -> None:
        owner = type(self).__name__
        checked = activation(act, negative_slope, alpha, name=owner)
        check_save(save, owner)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **options)
        self.act, self.negative_slope, self.alpha = checked.name, checked.negative_slope, checked.alpha
        self.save = save

    @property
    def _activation(self) -> Activation:
        # Built on use, so assigning layer.act / negative_slope / alpha takes effect.
        return Activation(self.act, self.negative_slope, self.alpha)

    def _variant_options(self, update: bool) -> dict:
        return {"act": self.act, "negative_slope": self.negative_slope, "alpha": self.alpha, "save": self.save}

    def split(self) -> tuple[nn.Module, nn.Module]:
        """``(batch_norm, activation)``: a normlab batch norm with this layer's options and a copy
        of its state, and the activation as a ``torch.nn`` module; ``activation(batch_norm(x))``
        equals ``self(x)``. For tools that replace or fold batch norms.

        >>> import torch
        >>> from normlab.layers.act import BatchNormAct2d
        >>> bn, act = BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2).split()
        >>> type(bn).__name__, act
        ('BatchNorm2d', LeakyReLU(negative_slope=0.2))
        """
        plain = self._plain_class(
            self.num_features, self.eps, self.momentum, self.affine, self.track_running_stats,
            bias=self.bias is not None or not self.affine, single_sample=self.single_sample, on_nonfinite=self.on_nonfinite, unbiased=self.unbiased,
            stable_stats=self.stable_stats,
        )
        # assign=True keeps this layer's devices and dtypes; the clones keep the two independent.
        state = {key: value.detach().clone() for key, value in self.state_dict().items()}
        plain.load_state_dict(state, assign=True)
        return plain.train(self.training), self._activation.module()

    def extra_repr(self) -> str:
        extra = super().extra_repr() + f", act={self.act!r}"
        if self.act == "leaky_relu":
            extra += f", negative_slope={self.negative_slope}"
        if self.act == "elu":
            extra += f", alpha={self.alpha}"
        if self.save != "auto":
            extra += f", save={self.save!r}"
        return extra


_DOC_ARGS = """
    Args:
        num_features, eps, momentum, affine, track_running_stats: as ``torch.nn.BatchNorm2d``.
        act: ``"identity"``, ``"relu"`` (default), ``"leaky_relu"``, ``"elu"`` or ``"silu"``.
        negative_slope: slope of leaky_relu for z < 0 (default 0.01).
        alpha: ELU's ``alpha`` (default 1.0): ``alpha * (exp(z) - 1)`` for z < 0.
        save: ``"auto"`` (default) keeps the output alone where the activation is invertible
            and the input otherwise (see :mod:`normlab.functional.act`); ``"input"`` always keeps
            the input (exact for ELU's saturated elements, one tensor more for the
            invertible activations).
        bias, single_sample, on_nonfinite, unbiased, stable_stats (keyword-only): see
            :mod:`normlab.layers.batch`.
"""


class BatchNormAct1d(_BatchNormActMixin, BatchNorm1d):
    __doc__ = """Batch norm over ``(N, C)`` or ``(N, C, L)`` input followed by an activation, fused.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``; state dict of ``BatchNorm1d``.
    """ + _DOC_ARGS + """
    >>> import torch
    >>> from normlab.layers.act import BatchNormAct1d
    >>> layer = BatchNormAct1d(3, act="silu")
    >>> bool((layer(torch.randn(8, 3)) >= -0.2785).all())  # silu's minimum is -0.2785
    True
    """
    _plain_class = BatchNorm1d


class BatchNormAct2d(_BatchNormActMixin, BatchNorm2d):
    __doc__ = """Batch norm over ``(N, C, H, W)`` input followed by an activation, fused.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``; state dict of ``BatchNorm2d``.
    """ + _DOC_ARGS + """
    >>> import torch
    >>> from normlab.layers.act import BatchNormAct2d
    >>> layer = BatchNormAct2d(8, act="leaky_relu", negative_slope=0.01)
    >>> layer.load_state_dict(torch.nn.BatchNorm2d(8).state_dict())
    <All keys matched successfully>
    >>> x = torch.randn(4, 8, 5, 5)
    >>> reference = torch.nn.functional.leaky_relu(torch.nn.BatchNorm2d(8)(x), 0.01)
    >>> torch.allclose(layer(x), reference, atol=1e-6)
    True
    """
    _plain_class = BatchNorm2d


class BatchNormAct3d(_BatchNormActMixin, BatchNorm3d):
    __doc__ = """Batch norm over ``(N, C, D, H, W)`` input followed by an activation, fused.

    ``y = act(gamma * (x - mean) / sqrt(var + eps) + beta)``; state dict of ``BatchNorm3d``.
    """ + _DOC_ARGS + """
    >>> import torch
    >>> from normlab.layers.act import BatchNormAct3d
    >>> BatchNormAct3d(2, act="elu")(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """
    _plain_class = BatchNorm3d
