"""Issue 15, item 6: inputs checked at the door.

Each bad input gets a ``TypeError``/``ValueError`` that names the layer (or function), the value
received and the fix, instead of torch's internals (``AttributeError: 'list' object has no
attribute 'dim'``, ``NotImplementedError: "batch_norm" not implemented for 'Long'``) or a silent
wrong result (integer running statistics that stay 0, a group of one value that outputs the
bias, an instance norm built for another channel count).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import normlab
import normlab.functional as NF
from normlab.surgery import batch_vs_running_gap, check_stats, fold_batchnorm, recalibrate_bn, train_eval_gap

# Every normlab layer, built for 3 channels / features, with an input it accepts.
LAYERS = {
    "BatchNorm1d": (lambda: normlab.BatchNorm1d(3), (4, 3)),
    "BatchNorm2d": (lambda: normlab.BatchNorm2d(3), (4, 3, 2, 2)),
    "BatchNorm3d": (lambda: normlab.BatchNorm3d(3), (4, 3, 2, 2, 2)),
    "BatchNormAct2d": (lambda: normlab.BatchNormAct2d(3, act="relu"), (4, 3, 2, 2)),
    "BatchRenorm2d": (lambda: normlab.BatchRenorm2d(3), (4, 3, 2, 2)),
    "GhostBatchNorm2d": (lambda: normlab.GhostBatchNorm2d(3, virtual_batch_size=2), (4, 3, 2, 2)),
    "SyncBatchNorm": (lambda: normlab.SyncBatchNorm(3), (4, 3, 2, 2)),
    "InstanceNorm2d": (lambda: normlab.InstanceNorm2d(3), (4, 3, 2, 2)),
    "GroupNorm": (lambda: normlab.GroupNorm(1, 3), (4, 3, 2, 2)),
    "LayerNorm": (lambda: normlab.LayerNorm(3), (4, 3)),
    "RMSNorm": (lambda: normlab.RMSNorm(3), (4, 3)),
    "FrozenBatchNorm2d": (lambda: normlab.FrozenBatchNorm2d(3), (4, 3, 2, 2)),
    "FrozenBatchNormAct2d": (lambda: normlab.FrozenBatchNormAct2d(3, act=torch.nn.ReLU()), (4, 3, 2, 2)),
}
FROZEN = ("FrozenBatchNorm2d", "FrozenBatchNormAct2d")


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("kind", ["list", "numpy"])
def test_a_list_or_numpy_array_instead_of_a_tensor(name, kind):
    make, shape = LAYERS[name]
    x = torch.randn(shape)
    value = x.tolist() if kind == "list" else x.cpu().numpy()
    with pytest.raises(TypeError, match=rf"^{name}\(.*input must be a torch.Tensor, got "
                                        rf"{type(value).__name__}; convert it with torch.as_tensor"):
        make()(value)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool, torch.complex64])
def test_integer_bool_and_complex_tensors(name, dtype):
    make, shape = LAYERS[name]
    x = (torch.rand(shape) * 4).to(dtype)
    layer = make()
    if name in FROZEN and not dtype.is_complex:
        # A frozen norm is an affine map: integers and bools are promoted, as torchvision's
        # FrozenBatchNorm2d does; the result is the map of their float values.
        torch.testing.assert_close(layer(x), layer(x.float()))
        return
    with pytest.raises(TypeError, match=rf"^{name}\(.*input must be a floating-point tensor .*got "
                                        rf"{str(dtype)}; convert it with x.float\(\)"):
        layer(x)


@pytest.mark.parametrize("make", [
    lambda: normlab.LayerNorm(0), lambda: normlab.LayerNorm((4, 0)), lambda: normlab.LayerNorm(-3),
    lambda: normlab.LayerNorm(()), lambda: normlab.RMSNorm(0), lambda: normlab.RMSNorm((2, -1)),
], ids=["ln-0", "ln-(4,0)", "ln-neg", "ln-empty", "rms-0", "rms-neg"])
def test_layer_norm_zero_and_negative_shapes(make):
    with pytest.raises(ValueError, match=r"^(LayerNorm|RMSNorm): normalized_shape must be a positive int or a "
                                         r"non-empty sequence of positive ints .*got "):
        make()


def test_functional_layer_norm_checks_its_shape_too():
    with pytest.raises(ValueError, match=r"^layer_norm: normalized_shape must be .*got \[4, 0\]"):
        NF.layer_norm(torch.randn(2, 4, 0), (4, 0))
    with pytest.raises(ValueError, match=r"^rms_norm: normalized_shape must be .*got \[-1\]"):
        NF.rms_norm(torch.randn(2, 4), -1)


EPS_CONSTRUCTORS = {
    "BatchNorm2d": lambda eps: normlab.BatchNorm2d(3, eps=eps),
    "BatchRenorm2d": lambda eps: normlab.BatchRenorm2d(3, eps=eps),
    "GhostBatchNorm2d": lambda eps: normlab.GhostBatchNorm2d(3, eps=eps),
    "BatchNormAct2d": lambda eps: normlab.BatchNormAct2d(3, eps=eps),
    "SyncBatchNorm": lambda eps: normlab.SyncBatchNorm(3, eps=eps),
    "InstanceNorm2d": lambda eps: normlab.InstanceNorm2d(3, eps=eps),
    "GroupNorm": lambda eps: normlab.GroupNorm(1, 3, eps=eps),
    "LayerNorm": lambda eps: normlab.LayerNorm(3, eps=eps),
    "RMSNorm": lambda eps: normlab.RMSNorm(3, eps=eps),
    "FrozenBatchNorm2d": lambda eps: normlab.FrozenBatchNorm2d(3, eps=eps),
    "RecurrentBatchNorm": lambda eps: normlab.RecurrentBatchNorm(3, max_steps=2, eps=eps),
}


@pytest.mark.parametrize("name", list(EPS_CONSTRUCTORS))
@pytest.mark.parametrize("eps", [0.0, -1e-5, math.inf, math.nan], ids=["zero", "negative", "inf", "nan"])
def test_eps_zero_negative_infinite_or_nan(name, eps):
    with pytest.raises(ValueError, match=rf"^{name}: eps must be a finite number > 0 \(typically 1e-5; it keeps "
                                         rf"constant channels finite\), got {eps!r}"):
        EPS_CONSTRUCTORS[name](eps)


def test_eps_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"^BatchNorm2d: eps must be a finite number > 0.*got str '1e-5'"):
        normlab.BatchNorm2d(3, eps="1e-5")


def test_a_positive_eps_keeps_constant_channels_at_the_bias():
    """Why eps must be > 0: a constant channel normalizes to its bias (0/sqrt(0 + eps))."""
    layer = normlab.BatchNorm1d(2, eps=1e-5)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -2.0]))
    out = layer(torch.full((4, 2), 7.0))
    torch.testing.assert_close(out, torch.tensor([[0.5, -2.0]]).expand(4, 2))


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("key", ["negative_slope", "alpha"])
def test_nan_negative_slope(key, value):
    act = "leaky_relu" if key == "negative_slope" else "elu"
    with pytest.raises(ValueError, match=rf"^BatchNormAct2d: {key} must be a finite number .*got {value!r}"):
        normlab.BatchNormAct2d(3, act=act, **{key: value})
    with pytest.raises(ValueError, match=rf"^batch_norm_act: {key} must be a finite number"):
        NF.batch_norm_act(torch.randn(4, 3), training=True, act=act, **{key: value})


FUNCTIONALS = {
    "batch_norm": lambda x, **kw: NF.batch_norm(x, training=True, **kw),
    "batch_renorm": lambda x, **kw: NF.batch_renorm(x, torch.zeros(3), torch.ones(3), training=True,
                                                    num_batches_tracked=torch.tensor(0), **kw),
    "ghost_batch_norm": lambda x, **kw: NF.ghost_batch_norm(x, training=True, virtual_batch_size=2, **kw),
    "batch_norm_with_stats": lambda x, **kw: NF.batch_norm_with_stats(x, **kw),
    "batch_norm_act": lambda x, **kw: NF.batch_norm_act(x, training=True, **kw),
    "instance_norm": lambda x, **kw: NF.instance_norm(x, **kw),  # the type and eps are checked before the rank
    "group_norm": lambda x, **kw: NF.group_norm(x, 1, **kw),
    "layer_norm": lambda x, **kw: NF.layer_norm(x, 3, **kw),
    "rms_norm": lambda x, **kw: NF.rms_norm(x, 3, **kw),
}


@pytest.mark.parametrize("fn", list(FUNCTIONALS))
@pytest.mark.parametrize("eps", [0.0, -1.0, math.nan])
def test_the_functional_api_checks_eps(fn, eps):
    with pytest.raises(ValueError, match=rf"^{fn}: eps must be a finite number > 0"):
        FUNCTIONALS[fn](torch.randn(4, 3), eps=eps)


@pytest.mark.parametrize("fn", list(FUNCTIONALS))
def test_the_functional_api_checks_the_input_type(fn):
    with pytest.raises(TypeError, match=rf"^{fn}: input must be a floating-point tensor .*got torch.int64"):
        FUNCTIONALS[fn](torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(TypeError, match=rf"^{fn}: input must be a torch.Tensor, got ndarray"):
        FUNCTIONALS[fn](np.ones((4, 3), np.float32))


@pytest.mark.parametrize("fn", ["batch_norm", "batch_norm_act", "instance_norm"])
def test_integer_running_statistics_are_refused_not_returned_as_zeros(fn):
    """Before: an int64 running mean came back all zeros (every update truncated)."""
    x = torch.randn(4, 3, 2) + 10.0
    rm, rv = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    call = {
        "batch_norm": lambda: NF.batch_norm(x, rm, rv, training=True, num_batches_tracked=torch.tensor(0)),
        "batch_norm_act": lambda: NF.batch_norm_act(x, rm, rv, training=True, num_batches_tracked=torch.tensor(0)),
        "instance_norm": lambda: NF.instance_norm(x, rm, rv),
    }[fn]
    with pytest.raises(TypeError, match=rf"^{fn}: running_mean must be a floating-point tensor .*got torch.int64; "
                                        rf"convert it with running_mean.float\(\)"):
        call()


@pytest.mark.parametrize("shape, groups", [((2, 3), 3), ((8, 6, 1, 1), 6), ((1, 4), 4)])
def test_one_value_per_group_in_group_norm_training(shape, groups):
    """Each group of one value outputs the bias whatever the input; torch raises its batch-norm
    message only for a batch of one ("more than 1 value per channel when training")."""
    layer = normlab.GroupNorm(groups, shape[1])
    with pytest.raises(ValueError, match=rf"^GroupNorm\({shape[1]}\): each group must hold more than one value .*"
                                         rf"got one .*num_groups={groups}; use fewer groups"):
        layer(torch.randn(shape))
    with pytest.raises(ValueError, match=r"^group_norm: each group must hold more than one value"):
        NF.group_norm(torch.randn(shape), groups)


def test_group_norm_with_two_values_per_group_still_matches_torch():
    x = torch.randn(1, 4, 2)
    torch.testing.assert_close(normlab.GroupNorm(4, 4)(x), torch.nn.GroupNorm(4, 4)(x))


@pytest.mark.parametrize("kwargs", [{}, {"track_running_stats": True}, {"affine": True}],
                         ids=["plain", "tracking", "affine"])
def test_instance_norm_with_a_channel_count_different_from_num_features(kwargs):
    """torch only warns for a plain InstanceNorm (its num_features is unused there)."""
    with pytest.raises(ValueError, match=r"^InstanceNorm2d\(4\): expected 4 channels in dimension 1, got input of "
                                         r"shape \(2, 3, 5, 5\); build the layer with num_features=3"):
        normlab.InstanceNorm2d(4, **kwargs)(torch.randn(2, 3, 5, 5))


@pytest.mark.parametrize("dim", ["1d", "2d", "3d"])
def test_a_mask_passed_to_ghost_batch_norm(dim):
    layer = getattr(normlab, f"GhostBatchNorm{dim}")(3, virtual_batch_size=2)
    shape = {"1d": (4, 3, 5), "2d": (4, 3, 2, 2), "3d": (4, 3, 2, 2, 2)}[dim]
    mask = torch.ones((shape[0],) + shape[2:], dtype=torch.bool)
    with pytest.raises(TypeError, match=rf"^GhostBatchNorm{dim}\(3\): ghost batch norm takes no mask .*"
                                        rf"use normlab.BatchNorm{dim}\(\.\.\., mask=mask\)"):
        layer(torch.randn(shape), mask=mask)


@pytest.mark.parametrize("tool, call", [
    ("check_stats", lambda: check_stats(None)),
    ("batch_vs_running_gap", lambda: batch_vs_running_gap(None, [torch.randn(4, 3)])),
    ("train_eval_gap", lambda: train_eval_gap(None, [(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))])),
    ("fold_batchnorm", lambda: fold_batchnorm(None)),
    ("recalibrate_bn", lambda: recalibrate_bn(None, [torch.randn(4, 3)])),
])
def test_check_stats_none(tool, call):
    with pytest.raises(TypeError, match=rf"^{tool}: model must be a torch.nn.Module, got NoneType"):
        call()
