"""Lazy batch and instance norms: ``LazyBatchNorm1d/2d/3d`` and ``LazyInstanceNorm1d/2d/3d``,
drop-in for torch's, that become normlab's layers.

A lazy layer is built without ``num_features``: its ``weight``, ``bias`` and running
statistics are uninitialized until the first forward, which reads the number of channels C
from the input, creates them (``weight`` 1, ``bias`` 0, statistics 0 / 1), and turns the
layer into the normlab layer of that C (``LazyBatchNorm2d`` becomes :class:`normlab.BatchNorm2d`,
``LazyInstanceNorm1d`` :class:`normlab.InstanceNorm1d`) before computing it, as torch's
``cls_to_become`` does. From then on the layer is that class: its repr, state dict, options and
numbers are the non-lazy layer's. A state dict of the materialized layer (or of torch's) loads
into an uninitialized one and materializes it.

Same constructor as torch's lazy layers, defaults included: note that torch's
``LazyInstanceNorm*`` default to ``affine=True, track_running_stats=True``, unlike
``InstanceNorm*``. Plus, keyword-only: ``bias`` (on every supported torch version, as the
non-lazy layers) and normlab's options (``single_sample``, ``on_nonfinite``, ``unbiased``,
``stable_stats`` for batch norm; ``on_nonfinite`` for instance norm), which the materialized
layer keeps.

Where torch's lazy layers go wrong, these do not: an input of the wrong rank raises before
anything is created (torch's would create parameters of the wrong size first); an unbatched
instance-norm input ``(C, L)`` gives C from dimension 0 (torch's reads dimension 1, L, and then
fails its own check); and ``num_features`` is always C, also for a layer without parameters or
statistics (``affine=False, track_running_stats=False``; torch's keeps 0) and for one whose
state dict was loaded before the first forward (the loaded tensors give C; torch's keeps 0).

>>> import torch, normlab
>>> bn = normlab.LazyBatchNorm2d(bias=False)
>>> y = bn(torch.randn(4, 3, 5, 5))
>>> bn
BatchNorm2d(3, eps=1e-05, momentum=0.1, affine=True, bias=False, track_running_stats=True)
>>> type(bn) is normlab.BatchNorm2d
True
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _LazyNormBase
from torch.nn.parameter import is_lazy

from .base import NonFinitePolicy, SingleSample, check_bias, check_eps, check_momentum, drop_bias
from .batch import BatchNorm1d, BatchNorm2d, BatchNorm3d, _BatchNormMixin
from .group import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d, _InstanceNormMixin

__all__ = [
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
]


class _LazyNormMixin:
    """Construction and materialization shared by the lazy layers; placed before the normlab
    mixin and torch's lazy class, whose ``_check_input_dim`` and ``_get_no_batch_dim`` it uses."""

    cls_to_become: type

    def _lazy_init(self, eps: float, momentum: float | None, affine: bool, track_running_stats: bool,
                   device, dtype, bias: bool) -> None:
        owner = type(self).__name__
        check_eps(owner, eps)
        check_momentum(owner, momentum)
        check_bias(owner, bias)
        # torch's lazy constructor, called without ``bias`` (torch < 2.13 lacks it): uninitialized
        # weight, bias and statistics, num_features 0, the materializing pre-hook.
        _LazyNormBase.__init__(self, eps, momentum, affine, track_running_stats, device, dtype)
        drop_bias(self, bias)

    def reset_parameters(self) -> None:
        if not self.has_uninitialized_params() and self.num_features != 0:
            super().reset_parameters()

    def _channel_dim(self, input: Tensor) -> int:
        return 1

    def initialize_parameters(self, input: Tensor, *args, **kwargs) -> None:
        """Create the parameters and statistics for ``input``'s channels (the forward pre-hook
        calls this once, before the first forward); the rank is checked first. Tensors that a
        state dict already materialized decide C and keep their values."""
        if self.num_features != 0 and not self.has_uninitialized_params():
            return
        self._check_input_dim(input)
        tensors = [getattr(self, name) for name in ("weight", "bias", "running_mean", "running_var")]
        tensors = [t for t in tensors if t is not None]
        loaded = [t for t in tensors if not is_lazy(t)]
        self.num_features = int(loaded[0].shape[0] if loaded else input.shape[self._channel_dim(input)])
        self.__dict__.pop("_label_text", None)  # the label names C now
        if len(loaded) < len(tensors):
            with torch.no_grad():
                for tensor in tensors:
                    if is_lazy(tensor):
                        tensor.materialize((self.num_features,))
            self.reset_parameters()


class _LazyBatchNormMixin(_LazyNormMixin, _BatchNormMixin):
    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        single_sample: SingleSample = "error",
        on_nonfinite: NonFinitePolicy = "warn",
        unbiased: bool = True,
        stable_stats: bool = True,
    ) -> None:
        self._lazy_init(eps, momentum, affine, track_running_stats, device, dtype, bias)
        self._init_batch_options(single_sample, on_nonfinite, unbiased, stable_stats, dtype)


class _LazyInstanceNormMixin(_LazyNormMixin, _InstanceNormMixin):
    def __init__(
        self,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        on_nonfinite: NonFinitePolicy = "warn",
    ) -> None:
        self._lazy_init(eps, momentum, affine, track_running_stats, device, dtype, bias)
        self._init_options(on_nonfinite, dtype)

    def _channel_dim(self, input: Tensor) -> int:
        return 0 if input.dim() == self._get_no_batch_dim() else 1


class LazyBatchNorm1d(_LazyBatchNormMixin, nn.LazyBatchNorm1d):
    """:class:`normlab.BatchNorm1d` with C taken from the first input (see :mod:`normlab.layers.lazy`).

    Args:
        eps, momentum, affine, track_running_stats, device, dtype: as ``torch.nn.LazyBatchNorm1d``.
        bias, single_sample, on_nonfinite, unbiased, stable_stats (keyword-only): as
            :class:`normlab.BatchNorm1d`.

    >>> import torch, normlab
    >>> layer = normlab.LazyBatchNorm1d(momentum=0.01)
    >>> layer(torch.randn(8, 5)).shape, layer.running_mean.shape, type(layer).__name__
    (torch.Size([8, 5]), torch.Size([5]), 'BatchNorm1d')
    """

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_LazyBatchNormMixin, nn.LazyBatchNorm2d):
    """:class:`normlab.BatchNorm2d` with C taken from the first input; arguments as
    :class:`LazyBatchNorm1d`."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_LazyBatchNormMixin, nn.LazyBatchNorm3d):
    """:class:`normlab.BatchNorm3d` with C taken from the first input; arguments as
    :class:`LazyBatchNorm1d`."""

    cls_to_become = BatchNorm3d


class LazyInstanceNorm1d(_LazyInstanceNormMixin, nn.LazyInstanceNorm1d):
    """:class:`normlab.InstanceNorm1d` with C taken from the first input (see :mod:`normlab.layers.lazy`).

    Args:
        eps, momentum, affine, track_running_stats, device, dtype: as
            ``torch.nn.LazyInstanceNorm1d`` (``affine`` and ``track_running_stats`` default to
            True there, as here).
        bias, on_nonfinite (keyword-only): as :class:`normlab.InstanceNorm1d`.

    >>> import torch, normlab
    >>> layer = normlab.LazyInstanceNorm1d(affine=False, track_running_stats=False)
    >>> layer(torch.randn(3, 10)).shape, layer   # unbatched (C, L): C = 3
    (torch.Size([3, 10]), InstanceNorm1d(3, eps=1e-05, momentum=0.1, affine=False, bias=False, track_running_stats=False))
    """

    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(_LazyInstanceNormMixin, nn.LazyInstanceNorm2d):
    """:class:`normlab.InstanceNorm2d` with C taken from the first input; arguments as
    :class:`LazyInstanceNorm1d`."""

    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(_LazyInstanceNormMixin, nn.LazyInstanceNorm3d):
    """:class:`normlab.InstanceNorm3d` with C taken from the first input; arguments as
    :class:`LazyInstanceNorm1d`."""

    cls_to_become = InstanceNorm3d
