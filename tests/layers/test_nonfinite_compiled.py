"""Issue 11 item 6: the non-finite guard under torch.compile.

A compiled normlab batch norm let a NaN batch into its running statistics, counted the batch and
warned nothing: the guard's finite test, ``sum(stats) * 0 == 0``, is folded to ``True`` by
Inductor (joint-graph constant folding replaces a product with the integer 0 by 0, blind to NaN
and inf). ``aot_eager`` keeps the product, which is why the compile tests elsewhere, all on
``aot_eager``, never saw it.

Backends: the bug lives in Inductor, so every layer family is compiled with the default backend
(Inductor), in default and ``fullgraph=True`` mode. Both modes trace the same graph, and Inductor
caches compiled graphs within the process, so the second mode costs little; the first Inductor
compilation in a process pays a one-off start-up of several seconds. The 1d/3d variants differ
from the 2d ones only in an input-rank check and are not compiled again.

Host synchronization on CUDA cannot be observed without a GPU. Two CPU-runnable proxies stand
in: the compiled training step must trace as one graph without host reads (``explain``), and
the eager training step must run on the ``meta`` device, which takes the same non-CPU branches
as CUDA and fails on any read of a value (``bool``, ``int``, ``.item()``, ``.numpy()``).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from device_switch import generator
from torch import nn

import normlab
from normlab import functional as NF
from normlab.layers.act import BatchNormAct2d
from normlab.layers.ghost import GhostBatchNorm2d
from normlab.layers.group import InstanceNorm2d
from normlab.layers.recurrent import RecurrentBatchNorm
from normlab.layers.renorm import BatchRenorm2d
from normlab.layers.sync import SyncBatchNorm

Warning_ = normlab.NonFiniteStatisticsWarning

# One representative per family of layers with running statistics: (factory, input shape).
LAYERS = {
    "BatchNorm2d": (lambda **kw: normlab.BatchNorm2d(3, **kw), (4, 3, 2, 2)),
    "BatchRenorm2d": (lambda **kw: BatchRenorm2d(3, r_max=3.0, d_max=5.0, **kw), (4, 3, 2, 2)),
    # Four samples in virtual batches of two: the NaN lands in the first virtual batch only.
    "GhostBatchNorm2d": (lambda **kw: GhostBatchNorm2d(3, virtual_batch_size=2, **kw), (4, 3, 2, 2)),
    "BatchNormAct2d": (lambda **kw: BatchNormAct2d(3, **kw), (4, 3, 2, 2)),
    "InstanceNorm2d": (lambda **kw: InstanceNorm2d(3, track_running_stats=True, **kw), (4, 3, 2, 2)),
    "RecurrentBatchNorm": (lambda **kw: RecurrentBatchNorm(3, max_steps=2, **kw), (6, 3)),
    # Without an initialized process group it trains as a single process.
    "SyncBatchNorm": (lambda **kw: SyncBatchNorm(3, **kw), (4, 3, 2, 2)),
}
MODES = {"default": {}, "fullgraph": {"fullgraph": True}}
STATE = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _call(module: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x, 1) if isinstance(layer, RecurrentBatchNorm) else module(x)


def _batches(shape, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A finite batch, a batch with one NaN, and another finite batch (offset and scaled, so
    the running statistics visibly move)."""
    g = generator(seed)
    first = torch.randn(shape, generator=g) * 2 + 3
    bad = torch.randn(shape, generator=g)
    bad[0, 0] = float("nan")
    last = torch.randn(shape, generator=g) * 0.5 - 1
    return first, bad, last


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(layer, k).clone() for k in STATE if getattr(layer, k, None) is not None}


def _nonfinite_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, Warning_)]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(LAYERS))
def test_nan_batch_under_torch_compile_leaves_running_stats(name, mode):
    make, shape = LAYERS[name]
    layer = make().train()
    eager = copy.deepcopy(layer)  # the oracle: the eager guard, pinned against the reference elsewhere
    compiled = torch.compile(layer, **MODES[mode])
    first, bad, last = _batches(shape)

    _call(compiled, layer, first)
    _call(eager, eager, first)
    after_first = _state(layer)
    for key, value in after_first.items():
        torch.testing.assert_close(value, getattr(eager, key), rtol=1e-5, atol=1e-6, msg=key)
    assert not torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean)), "no update to test"

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _call(compiled, layer, bad)
    assert not _nonfinite_warnings(record), "compiled steps defer the report to model.eval()"
    for key, value in after_first.items():
        assert torch.equal(getattr(layer, key), value), f"{key} took the NaN batch in"
    assert int(layer.num_batches_skipped) == 1
    with pytest.warns(Warning_, match="non-finite statistics"):  # eager: at once
        _call(eager, eager, bad)

    # The next finite batch updates from the kept statistics, as in eager code.
    _call(compiled, layer, last)
    _call(eager, eager, last)
    for key in after_first:
        torch.testing.assert_close(getattr(layer, key), getattr(eager, key), rtol=1e-5, atol=1e-6, msg=key)
    assert int(layer.num_batches_skipped) == 1


@pytest.mark.parametrize("wrap", ["layer", "model"])
@pytest.mark.parametrize("name", ["BatchNorm2d", "GhostBatchNorm2d", "InstanceNorm2d", "RecurrentBatchNorm"])
def test_nan_batch_under_torch_compile_warns_at_eval(name, wrap):
    """The deferred report, when the compiled module is the layer itself (whose wrapper sets the
    layer's training flag before calling its train()) and when it is a model around it."""
    make, shape = LAYERS[name]
    layer = make().train()
    if wrap == "model" and name != "RecurrentBatchNorm":
        module = normlab.name_layers(nn.Sequential(nn.Identity(), layer))
    else:
        module = layer
    compiled = torch.compile(module, fullgraph=True)
    first, bad, _ = _batches(shape)
    _call(compiled, layer, first)
    _call(compiled, layer, bad)
    _call(compiled, layer, bad)
    label = r"\(3\) '1'" if module is not layer else r"\(3\)"
    with pytest.warns(Warning_, match=rf"{type(layer).__name__}{label}: 2 training batch\(es\) had non-finite"):
        compiled.eval()
    assert not layer.training
    with warnings.catch_warnings():
        warnings.simplefilter("error", Warning_)
        compiled.train()
        compiled.eval()  # reported once: nothing new to report
    assert int(layer.num_batches_skipped) == 2


@pytest.mark.parametrize("mode", list(MODES))
def test_nan_batch_under_torch_compile_raise_policy_raises_at_eval(mode):
    """A compiled step cannot raise on a value on the device without a host read and a graph
    break: the batch is skipped and counted, and model.eval() raises, the layer in eval mode."""
    layer = normlab.BatchNorm2d(3, on_nonfinite="raise").train()
    compiled = torch.compile(layer, **MODES[mode])
    first, bad, _ = _batches((4, 3, 2, 2))
    compiled(first)
    before = _state(layer)
    compiled(bad)  # no error inside the compiled step
    for key, value in before.items():
        assert torch.equal(getattr(layer, key), value), f"{key} took the NaN batch in"
    assert int(layer.num_batches_skipped) == 1
    with pytest.raises(FloatingPointError, match=(
        r"BatchNorm2d\(3\): 1 training batch\(es\) had non-finite statistics .* in compiled code "
        r"\(torch.compile\), where on_nonfinite='raise' cannot stop the step")):
        compiled.eval()
    assert not layer.training
    compiled.eval()  # raised once


def test_nan_batch_under_torch_compile_skip_policy_stays_silent():
    layer = normlab.BatchNorm2d(3, on_nonfinite="skip").train()
    compiled = torch.compile(layer, fullgraph=True)
    first, bad, _ = _batches((4, 3, 2, 2))
    compiled(first)
    before = _state(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Warning_)
        compiled(bad)
        compiled.eval()
    for key, value in before.items():
        assert torch.equal(getattr(layer, key), value), key
    assert int(layer.num_batches_skipped) == 1


@pytest.mark.parametrize("fn", ["batch_norm", "ghost_batch_norm", "batch_renorm", "instance_norm"])
def test_nan_batch_under_torch_compile_functional_keeps_statistics(fn):
    """The functional API itself, compiled with Inductor: ``updated`` False and the given
    statistics returned unchanged for a NaN batch (the root of the layer failures)."""
    def step(x, rm, rv, count):
        if fn == "instance_norm":
            r = NF.instance_norm(x, rm, rv, use_input_stats=True)
            return r.running_mean, r.running_var, count, r.updated
        if fn == "ghost_batch_norm":
            r = NF.ghost_batch_norm(x, 2, rm, rv, training=True, num_batches_tracked=count)
        elif fn == "batch_renorm":
            r = NF.batch_renorm(x, rm, rv, training=True, num_batches_tracked=count)
        else:
            r = NF.batch_norm(x, rm, rv, training=True, num_batches_tracked=count)
        return r.running_mean, r.running_var, r.num_batches_tracked, r.updated

    compiled = torch.compile(step, fullgraph=True)
    _, bad, good = _batches((4, 3, 2, 2))
    rm, rv, count = torch.full((3,), 0.5), torch.full((3,), 2.0), torch.tensor(7)
    new_mean, new_var, new_count, updated = compiled(bad, rm, rv, count)
    assert updated.dtype == torch.bool and not bool(updated)
    assert torch.equal(new_mean, rm) and torch.equal(new_var, rv) and int(new_count) == 7
    # The same graph on a finite batch: updated, and the eager numbers.
    got, want = compiled(good, rm, rv, count), step(good, rm, rv, count)
    assert bool(got[3])
    for g, w in zip(got[:3], want[:3]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["warn", "raise"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_nan_guard_compiles_as_one_graph_without_host_reads(name, policy):
    """What CUDA graphs (torch.compile(mode="reduce-overhead")) need: the training step traces
    as one graph, and no node reads a value back to the host."""
    make, shape = LAYERS[name]
    layer = make(on_nonfinite=policy).train()
    x = _batches(shape)[0]
    explained = torch._dynamo.explain(layer)(*((x, 1) if name == "RecurrentBatchNorm" else (x,)))
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1
    host_reads = {"item", "tolist", "numpy", "__bool__", "cpu", torch.ops.aten._local_scalar_dense.default}
    nodes = [node for graph in explained.graphs for node in graph.graph.nodes]
    assert not [n for n in nodes if n.target in host_reads], "a host read inside the compiled step"
    counted = [n for n in nodes if n.target == "add_" and "num_batches_skipped" in str(n.args[0])]
    assert counted, "the skipped-batch count is not updated inside the graph"


@pytest.mark.parametrize("name", list(LAYERS))
def test_nan_guard_reads_nothing_from_the_host_off_cpu(name):
    """The eager training step (forward and backward) on the meta device, where any read of a
    value fails: the guard, the count and the deferred report's bookkeeping stay on the device,
    as they must on CUDA."""
    make, shape = LAYERS[name]
    layer = make(device="meta").train()
    x = torch.empty(shape, device="meta", requires_grad=True)
    y = _call(layer, layer, x)
    y.sum().backward()
    assert layer.num_batches_skipped.device.type == "meta"
    assert layer.running_mean.device.type == "meta"
