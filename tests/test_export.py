"""Issue 15 item 4, export paths: ``torch.export`` in training and eval mode, ``torch.jit.script``
(a clear error naming what works instead) and ``torch.jit.trace``, ONNX export run by
onnxruntime. torch's own layers, exported the same way, are the oracle; for ONNX, normlab's
eager outputs are."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import normlab
from torch_pairs import PAIRS, pair, tensor_state


def _export(module: nn.Module, x: torch.Tensor) -> nn.Module:
    return torch.export.export(module, (x,)).module()


# --------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_issue15_item4_torch_export_matches_torchs_exported_layer(name, mode):
    """The exported program gives torch's exported layer's output on a new input, and in
    training mode moves the running statistics (and the batch count) as torch's does."""
    ours, theirs, x = pair(name)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    before = tensor_state(theirs)
    ours_exported, theirs_exported = _export(ours, x), _export(theirs, x)
    other = torch.randn_like(x) * 3 - 2  # not the tracing input: nothing data-dependent baked in
    for step in range(2):
        assert_close(ours_exported(other + step), theirs_exported(other + step))
        assert_close(tensor_state(ours_exported), tensor_state(theirs_exported))
    if mode == "train" and "running_mean" in before:  # the comparison saw the statistics move
        assert not torch.equal(tensor_state(theirs_exported)["running_mean"], before["running_mean"])


@pytest.mark.parametrize("name", ["InstanceNorm2d", "BatchNorm2d-untracked"])
def test_issue15_item4_untracked_layer_exports_as_root_module(name):
    """Issue 15 item 4: an untracked InstanceNorm2d failed torch.export with an IndexError inside
    torch (its None statistics stood before normlab's skip counter among the buffers, which
    torch's tracer pairs with graph inputs by position)."""
    ours, theirs, x = pair(name)
    for mode in (True, False):
        exported = _export(ours.train(mode), x)
        assert_close(exported(x), theirs.train(mode)(x))


def test_frozen_batch_norm_without_affine_exports_as_root_module():
    """Same rule for the frozen layer: its None weight and bias stand after the statistics."""
    frozen = normlab.FrozenBatchNorm2d(4, affine=False)
    frozen.running_mean.uniform_(-1, 1)
    bn = nn.BatchNorm2d(4, affine=False).eval()
    bn.load_state_dict(frozen.state_dict())
    x = torch.randn(2, 4, 3, 3)
    assert_close(_export(frozen, x)(x), bn(x))
    assert list(frozen.state_dict()) == list(bn.state_dict())


# --------------------------------------------------------------------------------------------
# TorchScript
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PAIRS))
def test_issue15_item4_jit_script_raises_an_error_that_names_torch_export(name):
    """torch's counterpart scripts; normlab's layer (alone or inside a model) raises a TypeError
    that names the layer and the ways that work, instead of a parser error inside the layer."""
    ours, theirs, x = pair(name)
    scripted = torch.jit.script(theirs)
    assert_close(scripted(x), copy.deepcopy(theirs)(x))
    label = type(ours).__name__
    with pytest.raises(TypeError, match=rf"{label}\(.*torch\.jit\.script.*torch\.export\.export.*torch\.jit\.trace"):
        torch.jit.script(ours)
    with pytest.raises(TypeError, match=rf"{label}\(.*'1'.*torch\.export"):
        torch.jit.script(normlab.name_layers(nn.Sequential(nn.Identity(), ours)))


@pytest.mark.parametrize("name", list(PAIRS))
def test_issue15_item4_jit_trace_in_eval_mode_matches_torch(name):
    """The TorchScript route the error names: a traced eval-mode layer computes torch's output
    on a new input."""
    ours, theirs, x = pair(name)
    with warnings.catch_warnings():
        # The shape checks read shapes, which a trace fixes anyway; no statistic is read.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(ours.eval(), x)
    other = torch.randn_like(x) * 3 - 1  # other statistics than the tracing input's
    assert_close(traced(other), theirs.eval()(other))
