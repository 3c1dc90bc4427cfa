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


# torch's own layer fails torch.export here (its cumulative average divides by
# float(num_batches_tracked), a data-dependent value); its eager forward is the oracle then.
TORCH_CANNOT_EXPORT = {("BatchNorm1d-cumulative", "train")}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", list(PAIRS))
def test_issue15_item4_torch_export_matches_torchs_exported_layer(name, mode):
    """The exported program gives torch's exported layer's output on a new input, and in
    training mode moves the running statistics (and the batch count) as torch's does."""
    ours, theirs, x = pair(name)
    ours.train(mode == "train")
    theirs.train(mode == "train")
    before = tensor_state(theirs)
    ours_exported = _export(ours, x)
    if (name, mode) in TORCH_CANNOT_EXPORT:
        with pytest.raises(Exception, match="data-dependent"):
            _export(copy.deepcopy(theirs), x)
        theirs_exported = theirs
    else:
        theirs_exported = _export(theirs, x)
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


# torch's SyncBatchNorm does not script either (its forward asks torch.distributed).
TORCH_CANNOT_SCRIPT = {"SyncBatchNorm"}


@pytest.mark.parametrize("name", list(PAIRS))
def test_issue15_item4_jit_script_raises_an_error_that_names_torch_export(name):
    """torch's counterpart scripts (but SyncBatchNorm); normlab's layer (alone or inside a model) raises a TypeError
    that names the layer and the ways that work, instead of a parser error inside the layer."""
    ours, theirs, x = pair(name)
    if name in TORCH_CANNOT_SCRIPT:
        with pytest.raises(Exception):
            torch.jit.script(copy.deepcopy(theirs))
    else:
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


# --------------------------------------------------------------------------------------------
# ONNX, run by onnxruntime
# --------------------------------------------------------------------------------------------


class Zoo(nn.Module):
    """Every normlab layer with a torch counterpart, the fused and frozen batch norms, each
    behind a Conv or Linear (so fold_batchnorm has pairs to fold), on 2-D, 3-D, 4-D and 5-D
    inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), normlab.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1), normlab.BatchNormAct2d(8),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), normlab.FrozenBatchNorm2d(8),
            normlab.GroupNorm(4, 8), normlab.InstanceNorm2d(8, affine=True, track_running_stats=True),
            normlab.InstanceNorm2d(8),
        )
        self.volume = nn.Sequential(
            nn.Conv3d(2, 4, 3, padding=1), normlab.BatchNorm3d(4), normlab.InstanceNorm3d(4, affine=True),
            normlab.BatchNormAct3d(4, act="leaky_relu", negative_slope=0.1),
        )
        self.sequence = nn.Sequential(
            nn.Conv1d(4, 6, 3, padding=1), normlab.BatchNorm1d(6), normlab.InstanceNorm1d(6),
            normlab.FrozenBatchNormAct1d(6, act=nn.SiLU()), normlab.SyncBatchNorm(6),
        )
        self.head = nn.Sequential(
            nn.Linear(8, 16), normlab.BatchNorm1d(16), normlab.LayerNorm(16), normlab.RMSNorm(16),
            nn.Linear(16, 4), normlab.BatchNormAct1d(4, act="elu"),
        )

    def forward(self, image, volume, sequence):
        features = self.image(image).mean((2, 3))
        return self.head(features), self.volume(volume), self.sequence(sequence)


def _zoo_inputs(gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    return (torch.randn(4, 3, 6, 6, generator=gen) * 2 + 1, torch.randn(3, 2, 3, 4, 4, generator=gen),
            torch.randn(5, 4, 7, generator=gen) - 1)


@pytest.fixture(scope="module")
def zoo() -> nn.Module:
    """The zoo with trained running statistics and non-trivial frozen buffers, in eval mode."""
    torch.manual_seed(0)
    model = Zoo()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for frozen in (model.image[6], model.sequence[3]):
            frozen.weight.uniform_(0.5, 2, generator=gen)
            frozen.bias.uniform_(-1, 1, generator=gen)
            frozen.running_mean.uniform_(-1, 1, generator=gen)
            frozen.running_var.uniform_(0.5, 2, generator=gen)
        for _ in range(3):
            model.train()(*_zoo_inputs(gen))
    return model.eval()


def _onnx_outputs(model: nn.Module, inputs: tuple[torch.Tensor, ...], runs: list) -> list:
    """Export ``model`` with torch.onnx (torch.export underneath) and run each input tuple of
    ``runs`` in onnxruntime."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, inputs, dynamo=True, verbose=False)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return [session.run(None, dict(zip(names, (t.numpy() for t in run)))) for run in runs]


def _check_onnx(model: nn.Module, reference: nn.Module) -> None:
    gen = torch.Generator().manual_seed(2)
    runs = [_zoo_inputs(gen), _zoo_inputs(gen)]
    for run, outputs in zip(runs, _onnx_outputs(model, _zoo_inputs(gen), runs)):
        with torch.no_grad():
            expected = reference(*run)
        assert len(outputs) == len(expected)
        for got, want in zip(outputs, expected):
            assert_close(torch.from_numpy(got), want, rtol=1e-4, atol=1e-5)


def test_issue15_item4_onnx_export_of_an_eval_model_runs_in_onnxruntime(zoo):
    """Every layer of the zoo in one exported graph; onnxruntime gives normlab's eager outputs on
    inputs other than the tracing ones."""
    _check_onnx(zoo, zoo)


def test_issue15_item4_onnx_export_of_a_folded_model_runs_in_onnxruntime(zoo):
    """The model after fold_batchnorm exports too, and gives the unfolded model's outputs."""
    folded, report = normlab.surgery.fold_batchnorm(zoo)
    assert len(report.folded) == 7  # every batch norm behind a Conv/Linear, fused ones included
    _check_onnx(folded, zoo)
