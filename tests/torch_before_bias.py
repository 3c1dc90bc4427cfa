"""torch's norm base classes as they were before torch 2.13 gave them ``bias=``, for tests.

normlab promises ``bias=`` on every torch it supports (>= 2.3), and the suite runs on one torch.
:func:`emulate` patches the running torch's ``_NormBase``, ``_BatchNorm``, ``_InstanceNorm``,
``_LazyNormBase`` and ``GroupNorm`` (with pytest's ``monkeypatch``, so the end of the test undoes
it) to behave as torch 2.3-2.12's: constructors without a ``bias`` argument that always create a
bias with the weight, a ``reset_parameters`` that zeroes the bias it assumes, a lazy
materialization that materializes it, and reprs without a ``bias=`` field. Written from that
behaviour, not copied: only what normlab could lean on is reproduced.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import init
from torch.nn.modules import batchnorm, instancenorm, normalization
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter


def _norm_base_init(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                    device=None, dtype=None):
    nn.Module.__init__(self)
    factory = {"device": device, "dtype": dtype}
    self.num_features, self.eps, self.momentum = num_features, eps, momentum
    self.affine, self.track_running_stats = affine, track_running_stats
    if affine:
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
    else:
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
    if track_running_stats:
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
    else:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, None)
    self.reset_parameters()


def _subclass_init(base, affine_default: bool):
    def init_(self, num_features, eps=1e-5, momentum=0.1, affine=affine_default, track_running_stats=affine_default,
              device=None, dtype=None):
        super(base, self).__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                                   dtype=dtype)

    return init_


def _norm_base_reset(self):
    self.reset_running_stats()
    if self.affine:
        init.ones_(self.weight)
        init.zeros_(self.bias)  # fails for a layer without a bias


def _norm_base_repr(self):
    return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, "
            "track_running_stats={track_running_stats}".format(**self.__dict__))


def _lazy_init(self, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None, dtype=None):
    factory = {"device": device, "dtype": dtype}
    super(batchnorm._LazyNormBase, self).__init__(0, eps, momentum, False, False, **factory)
    self.affine, self.track_running_stats = affine, track_running_stats
    if affine:
        self.weight = UninitializedParameter(**factory)
        self.bias = UninitializedParameter(**factory)
    if track_running_stats:
        self.running_mean = UninitializedBuffer(**factory)
        self.running_var = UninitializedBuffer(**factory)
        self.num_batches_tracked = torch.tensor(0, dtype=torch.long, device=device)


def _lazy_initialize(self, input):
    if self.has_uninitialized_params():
        self.num_features = input.shape[1]
        if self.affine:
            self.weight.materialize((self.num_features,))
            self.bias.materialize((self.num_features,))  # fails for a layer without a bias
        if self.track_running_stats:
            self.running_mean.materialize((self.num_features,))
            self.running_var.materialize((self.num_features,))
        self.reset_parameters()


def _group_init(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None):
    nn.Module.__init__(self)
    factory = {"device": device, "dtype": dtype}
    if num_channels % num_groups:
        raise ValueError("num_channels must be divisible by num_groups")
    self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
    if affine:
        self.weight = nn.Parameter(torch.empty(num_channels, **factory))
        self.bias = nn.Parameter(torch.empty(num_channels, **factory))
    else:
        self.register_parameter("weight", None)
        self.register_parameter("bias", None)
    self.reset_parameters()


def _group_reset(self):
    if self.affine:
        init.ones_(self.weight)
        init.zeros_(self.bias)


def _group_repr(self):
    return "{num_groups}, {num_channels}, eps={eps}, affine={affine}".format(**self.__dict__)


def emulate(monkeypatch) -> None:
    """Make the running torch's norm classes behave as before 2.13 for the rest of the test."""
    for cls, name, value in (
        (batchnorm._NormBase, "__init__", _norm_base_init),
        (batchnorm._NormBase, "reset_parameters", _norm_base_reset),
        (batchnorm._NormBase, "extra_repr", _norm_base_repr),
        (batchnorm._BatchNorm, "__init__", _subclass_init(batchnorm._BatchNorm, True)),
        # instance norm: affine=False, track_running_stats=False by default
        (instancenorm._InstanceNorm, "__init__", _subclass_init(instancenorm._InstanceNorm, False)),
        (batchnorm._LazyNormBase, "__init__", _lazy_init),
        (batchnorm._LazyNormBase, "initialize_parameters", _lazy_initialize),
        (normalization.GroupNorm, "__init__", _group_init),
        (normalization.GroupNorm, "reset_parameters", _group_reset),
        (normalization.GroupNorm, "extra_repr", _group_repr),
    ):
        monkeypatch.setattr(cls, name, value)
