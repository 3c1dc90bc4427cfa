"""Issue 15 item 1: ``bias=`` on every normlab layer whose torch counterpart has it, on every
supported torch version: a weight without a bias, torch 2.13's state-dict keys and repr, strict
loading both ways. (The numbers of each layer against the float64 reference and torch.nn are in
the conformance cases named ``bias=False``; the model tools are in tests/surgery/test_bias_tools.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch_before_bias
from device_switch import generator
from torch import nn

import normlab
from normlab.layers.base import TORCH_NORM_HAS_BIAS
from normlab.layers.ghost import GhostBatchNorm2d
from normlab.layers.renorm import BatchRenorm2d
from normlab.layers.sync import SyncBatchNormAct, SyncBatchRenorm

# (id, normlab layer, torch.nn counterpart or None, input shape); each takes bias= as a keyword.
LAYERS = [
    ("BatchNorm1d", lambda **k: normlab.BatchNorm1d(3, **k), lambda **k: nn.BatchNorm1d(3, **k), (6, 3)),
    ("BatchNorm2d", lambda **k: normlab.BatchNorm2d(3, **k), lambda **k: nn.BatchNorm2d(3, **k), (4, 3, 5, 5)),
    ("BatchNorm3d", lambda **k: normlab.BatchNorm3d(3, **k), lambda **k: nn.BatchNorm3d(3, **k), (2, 3, 3, 3, 3)),
    ("SyncBatchNorm", lambda **k: normlab.SyncBatchNorm(3, **k), lambda **k: nn.SyncBatchNorm(3, **k), (4, 3, 5)),
    ("InstanceNorm1d", lambda **k: normlab.InstanceNorm1d(3, affine=True, **k),
     lambda **k: nn.InstanceNorm1d(3, affine=True, **k), (2, 3, 7)),
    ("InstanceNorm2d-tracking", lambda **k: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True, **k),
     lambda **k: nn.InstanceNorm2d(3, affine=True, track_running_stats=True, **k), (2, 3, 4, 5)),
    ("InstanceNorm3d", lambda **k: normlab.InstanceNorm3d(3, affine=True, **k),
     lambda **k: nn.InstanceNorm3d(3, affine=True, **k), (2, 3, 2, 3, 4)),
    ("GroupNorm", lambda **k: normlab.GroupNorm(3, 6, **k), lambda **k: nn.GroupNorm(3, 6, **k), (2, 6, 4)),
    ("BatchNormAct2d", lambda **k: normlab.BatchNormAct2d(3, act="identity", **k), lambda **k: nn.BatchNorm2d(3, **k),
     (4, 3, 5, 5)),
    ("BatchRenorm2d", lambda **k: BatchRenorm2d(3, **k), lambda **k: nn.BatchNorm2d(3, **k), (4, 3, 5, 5)),
    # one virtual batch here (the reference is batch norm's); conformance checks several
    ("GhostBatchNorm2d", lambda **k: GhostBatchNorm2d(3, virtual_batch_size=8, **k), lambda **k: nn.BatchNorm2d(3, **k),
     (4, 3, 5, 5)),
    ("SyncBatchRenorm", lambda **k: SyncBatchRenorm(3, **k), lambda **k: nn.BatchNorm2d(3, **k), (4, 3, 5, 5)),
    ("SyncBatchNormAct", lambda **k: SyncBatchNormAct(3, act="identity", **k), lambda **k: nn.BatchNorm2d(3, **k),
     (4, 3, 5, 5)),
    ("FrozenBatchNorm2d", lambda **k: normlab.FrozenBatchNorm2d(3, **k), lambda **k: nn.BatchNorm2d(3, **k),
     (4, 3, 5, 5)),
    ("FrozenBatchNormAct2d", lambda **k: normlab.FrozenBatchNormAct2d(3, **k), lambda **k: nn.BatchNorm2d(3, **k),
     (4, 3, 5, 5)),
    ("RecurrentBatchNorm", lambda **k: normlab.RecurrentBatchNorm(3, max_steps=1, **k), None, (6, 3)),
]
# Layers whose repr is torch's class's repr (same class name and fields).
SAME_REPR = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "InstanceNorm1d", "InstanceNorm2d-tracking",
             "InstanceNorm3d", "GroupNorm")
ids = [layer[0] for layer in LAYERS]


def _reference(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torch.nn.functional's answer for ``layer`` in its mode, with its (possibly absent) bias."""
    w, b = layer.weight, layer.bias
    if isinstance(layer, nn.GroupNorm):
        return F.group_norm(x, layer.num_groups, w, b, layer.eps)
    if isinstance(layer, nn.modules.instancenorm._InstanceNorm):
        tracking = layer.running_mean is not None
        stats = (layer.running_mean.clone(), layer.running_var.clone()) if tracking else (None, None)
        return F.instance_norm(x, *stats, w, b, layer.training or not tracking, 0.0, layer.eps)
    training = layer.training and not isinstance(layer, normlab.layers.frozen._FrozenBatchNorm)
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    if isinstance(layer, normlab.RecurrentBatchNorm):
        rm, rv = rm[0], rv[0]
    return F.batch_norm(x, rm, rv, w, b, training, 0.0, layer.eps)


def _randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 2.0, layer.weight.numel()))
    return layer


@pytest.mark.parametrize("make, make_torch, shape", [layer[1:] for layer in LAYERS], ids=ids)
def test_issue15_item1_bias_false_is_a_weight_without_a_bias(make, make_torch, shape):
    """No bias parameter or key; the output is x_hat * weight (torch.nn.functional with bias=None),
    in training and eval; reset_parameters works; the weight still learns."""
    layer = _randomize(make(bias=False))
    assert layer.bias is None and layer.weight is not None
    assert "bias" not in layer.state_dict() and "weight" in layer.state_dict()
    x = torch.randn(shape, generator=generator(0)) * 2 + 1
    kwargs = {"step": 0} if isinstance(layer, normlab.RecurrentBatchNorm) else {}
    for training in (True, False):
        layer.train(training)
        expected = _reference(layer, x)
        torch.testing.assert_close(layer(x, **kwargs), expected, atol=1e-5, rtol=1e-5)
    if isinstance(layer.weight, nn.Parameter):
        layer.train()(x, **kwargs).pow(2).sum().backward()
        assert layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0)
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
        torch.testing.assert_close(layer.weight.detach(), torch.ones_like(layer.weight))


@pytest.mark.skipif(not TORCH_NORM_HAS_BIAS, reason="this torch's norms have no bias= to compare with")
@pytest.mark.parametrize("make, make_torch, shape", [layer[1:] for layer in LAYERS if layer[2] is not None],
                         ids=[layer[0] for layer in LAYERS if layer[2] is not None])
def test_issue15_item1_bias_false_state_dict_is_torchs_and_loads_strictly_both_ways(make, make_torch, shape):
    ours, theirs = make(bias=False), make_torch(bias=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    source = _randomize(make_torch(bias=False))
    ours.load_state_dict(source.state_dict(), strict=True)
    torch.testing.assert_close(ours.weight, source.weight, rtol=0, atol=0)
    back = make_torch(bias=False)
    back.load_state_dict(ours.state_dict(), strict=True)
    with pytest.raises(RuntimeError, match=r'Unexpected key\(s\) in state_dict: "bias"'):
        make(bias=False).load_state_dict(make_torch().state_dict(), strict=True)


@pytest.mark.skipif(not TORCH_NORM_HAS_BIAS, reason="this torch's norms have no bias= to compare with")
@pytest.mark.parametrize("name", SAME_REPR)
def test_issue15_item1_repr_is_torchs(name):
    _, make, make_torch, _ = LAYERS[ids.index(name)]
    for kw in ({}, {"bias": False}, {"bias": True}):
        assert repr(make(**kw)) == repr(make_torch(**kw))


def test_issue15_item1_bias_must_be_a_bool():
    for make in (lambda: normlab.BatchNorm2d(3, bias="no"), lambda: normlab.GroupNorm(1, 3, bias=0),
                 lambda: normlab.InstanceNorm1d(3, bias=None), lambda: normlab.FrozenBatchNorm2d(3, bias=1),
                 lambda: normlab.LazyBatchNorm1d(bias="False")):
        with pytest.raises(TypeError, match=r"bias must be True or False \(False: a weight without a bias\), got "):
            make()


def test_issue15_item1_bias_false_survives_split_of_a_norm_act():
    layer = _randomize(normlab.BatchNormAct2d(3, act="leaky_relu", negative_slope=0.2, bias=False)).eval()
    plain, act = layer.split()
    assert plain.bias is None and list(plain.state_dict()) == list(layer.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(act(plain(x)), layer(x))


# --------------------------------------------------------------------------------------------
# Every supported torch: the same layers on a torch whose norms predate bias= (2.3 - 2.12)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ids)
def test_issue15_item1_bias_false_on_a_torch_without_it(monkeypatch, name):
    """normlab never hands bias= to torch, resets and shows it itself: on a torch whose norm
    constructors lack it, whose reset zeroes a bias it assumes and whose repr has no bias field,
    bias=False still builds, resets, computes and prints."""
    _, make, make_torch, shape = LAYERS[ids.index(name)]
    torch_before_bias.emulate(monkeypatch)
    with pytest.raises(TypeError, match="bias"):
        nn.BatchNorm2d(3, bias=False)  # the emulation is in force
    layer = _randomize(make(bias=False))
    assert layer.bias is None and "bias" not in layer.state_dict()
    x = torch.randn(shape, generator=generator(1))
    kwargs = {"step": 0} if isinstance(layer, normlab.RecurrentBatchNorm) else {}
    torch.testing.assert_close(layer.eval()(x, **kwargs), _reference(layer, x), atol=1e-5, rtol=1e-5)
    if hasattr(layer, "reset_parameters"):
        layer.reset_parameters()
    if name in SAME_REPR and name != "SyncBatchNorm":  # (torch's SyncBatchNorm passes bias= on itself)
        assert "affine=True, bias=False" in repr(layer)
        assert repr(make()) == repr(make_torch()), "bias=True: the repr of this torch's layer"


def test_issue15_item1_lazy_bias_false_on_a_torch_without_it(monkeypatch):
    torch_before_bias.emulate(monkeypatch)
    for lazy, shape in ((normlab.LazyBatchNorm2d(bias=False), (4, 3, 5, 5)),
                        (normlab.LazyInstanceNorm1d(bias=False), (2, 3, 6))):
        assert lazy.bias is None
        x = torch.randn(shape)
        y = lazy(x)
        assert lazy.bias is None and lazy.num_features == 3 and "bias" not in lazy.state_dict()
        torch.testing.assert_close(y, _reference(lazy.train(), x), atol=1e-5, rtol=1e-5)
