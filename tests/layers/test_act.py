"""BatchNormAct1d/2d/3d: fused batch norm + activation that keeps only what backward needs.

Oracles: torch's ``BatchNorm2d`` followed by the activation (outputs, gradients of x, weight
and bias, running statistics, second-order gradients), the float64 reference
:func:`normlab.reference.batch_norm_act` (in the conformance harness, ``cases_act.py``), and
autograd's own record of what it saves (``saved_tensors_hooks``) for the memory claims.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from device_switch import generator, to_numpy
from torch import nn

from normlab.layers.act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

ACTS = {
    "identity": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1),
    "elu": lambda z: F.elu(z, 0.7),
    "silu": F.silu,
}
KW = {"leaky_relu": dict(negative_slope=0.1), "elu": dict(alpha=0.7)}
INVERTIBLE = ("identity", "leaky_relu", "elu")


def make_pair(act: str, channels: int = 3, seed: int = 0, dtype=torch.float32, **kw):
    """A BatchNormAct2d and torch's BatchNorm2d with the same non-trivial state."""
    g = generator(seed)
    theirs = nn.BatchNorm2d(channels, dtype=dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.rand(channels, generator=g) * 1.5 + 0.5)
        theirs.weight[0].neg_()  # a negative gamma too
        theirs.bias.copy_(torch.randn(channels, generator=g) * 0.5)
        theirs.running_mean.copy_(torch.randn(channels, generator=g) * 0.5)
        theirs.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    ours = BatchNormAct2d(channels, act=act, dtype=dtype, **{**KW.get(act, {}), **kw})
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def run(layer, x, dy, act_fn=None):
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = layer(x) if act_fn is None else act_fn(layer(x))
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def sample(shape, seed, dtype=torch.float32):
    g = generator(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).mul(1.3).add(0.4).to(dtype)


def close(a, b, tol, what):
    a, b = a.detach(), b.detach()
    err = float((a.double() - b.double()).abs().max())
    scale = max(1.0, float(b.double().abs().max()))
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


# --------------------------------------------------------------------------------------------
# Same numbers as torch's BatchNorm2d followed by the activation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("save", ["auto", "input"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_matches_torch_batchnorm_then_activation(act, save, layout):
    ours, theirs = make_pair(act, save=save)
    shape = (6, 3, 5, 7)
    for step, training in enumerate([True, True, False]):
        ours.train(training), theirs.train(training)
        x, dy = sample(shape, 10 + step), sample(shape, 20 + step)
        if layout == "channels_last":
            x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
        got = run(ours, x, dy)
        want = run(theirs, x, dy, ACTS[act])
        for name, a, b in zip(("output", "dx", "dweight", "dbias"), got, want):
            close(a, b, 2e-5, f"{name} at step {step + 1} ({'train' if training else 'eval'})")
        close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
        close(ours.running_var, theirs.running_var, 1e-6, "running_var")
        assert torch.equal(ours.num_batches_tracked, theirs.num_batches_tracked)
        if layout == "channels_last":
            assert got[0].is_contiguous(memory_format=torch.channels_last)
            assert got[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "cls, shape",
    [(BatchNormAct1d, (7, 4)), (BatchNormAct1d, (300, 4)), (BatchNormAct1d, (5, 4, 6)), (BatchNormAct3d, (3, 4, 3, 2, 5))],
    ids=["1d-NC", "1d-NC-blocked", "1d-NCL", "3d"],
)
def test_other_ranks_match_torch(cls, shape):
    ours = cls(4, act="leaky_relu", negative_slope=0.2)
    theirs = getattr(nn, cls.__name__.replace("Act", ""))(4)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 2.0), theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, dy = sample(shape, 1), sample(shape, 2)
    for a, b in zip(run(ours, x, dy), run(theirs, x, dy, lambda z: F.leaky_relu(z, 0.2))):
        close(a, b, 2e-5, cls.__name__)


@pytest.mark.parametrize("act", ["leaky_relu", "elu", "silu", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_second_order_gradients_match_torch(act, training):
    ours, theirs = make_pair(act, dtype=torch.float64)
    ours.train(training), theirs.train(training)
    x = sample((4, 3, 3, 3), 5, torch.float64)
    results = []
    for layer, fn in ((ours, None), (theirs, ACTS[act])):
        xx = x.clone().requires_grad_(True)
        y = layer(xx) if fn is None else fn(layer(xx))
        (gx,) = torch.autograd.grad(y.pow(3).sum(), xx, create_graph=True)
        gxx, gw = torch.autograd.grad(gx.pow(2).sum(), (xx, layer.weight))
        results.append((gxx, gw))
    for a, b in zip(*results):
        close(a, b, 1e-9, f"second-order gradient ({act})")


# --------------------------------------------------------------------------------------------
# What autograd keeps
# --------------------------------------------------------------------------------------------


def saved_storages(fn, x):
    """The storages (data_ptr -> bytes) autograd saves while ``fn(x)`` runs, and the output."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(x)
    return saved, y


def large(saved: dict, min_bytes: int) -> set[int]:
    return {ptr for ptr, size in saved.items() if size >= min_bytes}


@pytest.mark.parametrize("act", list(ACTS))
def test_saves_only_the_output_or_only_the_input(act):
    ours, theirs = make_pair(act, channels=4)
    x = sample((8, 4, 16, 16), 3).requires_grad_(True)
    nbytes = x.numel() * x.element_size()
    saved, y = saved_storages(ours, x)
    big = large(saved, nbytes)
    if act in INVERTIBLE:  # In-Place ABN: the output is all that is kept
        assert big == {y.untyped_storage().data_ptr()}
    else:  # relu / silu: the input alone
        assert big == {x.untyped_storage().data_ptr()}
    assert sum(saved.values()) < nbytes + 4096  # plus a few per-channel vectors

    # Tensors of the input's size kept until backward, the output included: (ours, torch's).
    # torch's batch norm keeps x; leaky_relu, elu and silu keep their input z, relu its output.
    expected = {"identity": (1, 2), "leaky_relu": (1, 3), "elu": (1, 3), "silu": (2, 3), "relu": (2, 2)}[act]
    torch_saved, torch_y = saved_storages(lambda t: ACTS[act](theirs(t)), x)
    kept = len(large(torch_saved, nbytes) | {torch_y.untyped_storage().data_ptr()})
    assert (len(big | {y.untyped_storage().data_ptr()}), kept) == expected


def test_leaky_relu_keeps_a_third_of_torchs_memory():
    """The benchmark's measure on a small shape: saved bytes plus the output, once each."""
    ours, theirs = make_pair("leaky_relu", channels=8)
    x = sample((4, 8, 32, 32), 4).requires_grad_(True)
    totals = []
    for fn in (ours, lambda t: F.leaky_relu(theirs(t), 0.1)):
        saved, y = saved_storages(fn, x)
        saved[y.untyped_storage().data_ptr()] = y.untyped_storage().nbytes()
        totals.append(sum(saved.values()) / (x.numel() * x.element_size()))
    assert totals[1] == pytest.approx(3.0, abs=0.01)
    assert totals[0] == pytest.approx(1.0, abs=0.01)


# --------------------------------------------------------------------------------------------
# gamma near zero, ELU saturation: exact where recovery from the output would not be
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weight, bias",
    [([0.0, 1.0, 1.2], [0.3, 0.0, -0.2]), ([1e-3, 1.0, 1.2], [0.5, 0.0, -0.2]), ([-1e-40, 1.0, 1.2], [0.0, 0.1, 0.0])],
    ids=["gamma=0", "beta/gamma=500", "gamma-denormal"],
)
@pytest.mark.parametrize("act", INVERTIBLE)
def test_small_gamma_saves_the_input_and_gradients_stay_exact(weight, bias, act):
    ours, theirs = make_pair(act)
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.tensor(weight)), layer.bias.copy_(torch.tensor(bias))
    x, dy = sample((6, 3, 4, 4), 7).requires_grad_(True), sample((6, 3, 4, 4), 8)
    saved, y = saved_storages(ours, x)
    assert large(saved, x.numel() * 4) == {x.untyped_storage().data_ptr()}
    got, want = run(ours, x, dy), run(theirs, x, dy, ACTS[act])
    for name, a, b in zip(("output", "dx", "dweight", "dbias"), got, want):
        assert torch.isfinite(a).all(), name
        close(a, b, 2e-5, name)


def test_small_gamma_with_zero_beta_still_recovers_from_the_output():
    """|beta / gamma| is what amplifies rounding; a small gamma alone loses nothing."""
    ours, theirs = make_pair("leaky_relu")
    with torch.no_grad():
        for layer in (ours, theirs):
            layer.weight.copy_(torch.tensor([1e-4, 1.0, -2e-3])), layer.bias.copy_(torch.tensor([0.0, 0.2, 1e-5]))
    x, dy = sample((6, 3, 4, 4), 9).requires_grad_(True), sample((6, 3, 4, 4), 10)
    saved, y = saved_storages(ours, x)
    assert large(saved, x.numel() * 4) == {y.untyped_storage().data_ptr()}
    got, want = run(ours, x, dy), run(theirs, x, dy, ACTS["leaky_relu"])
    for name, a, b in zip(("dx", "dweight", "dbias"), got[1:], want[1:]):
        close(a, b, 1e-4, name)


def test_elu_saturated_elements_keep_gradients_finite_and_save_input_is_exact():
    ours, theirs = make_pair("elu")
    with torch.no_grad():
        for layer in (ours, theirs):  # z = 4 x_hat - 30 in channel 0: most of it saturated
            layer.weight.copy_(torch.tensor([4.0, 1.0, 1.0])), layer.bias.copy_(torch.tensor([-30.0, 0.0, 0.0]))
    x, dy = sample((6, 3, 4, 4), 11), sample((6, 3, 4, 4), 12)
    # |beta / gamma| = 7.5 keeps the output path: finite, and exact in the unsaturated channels.
    got, want = run(ours, x, dy), run(theirs, x, dy, ACTS["elu"])
    assert all(torch.isfinite(t).all() for t in got)
    close(got[1][:, 1:], want[1][:, 1:], 2e-5, "dx of unsaturated channels")
    close(got[3], want[3], 2e-5, "dbias")
    exact = copy.deepcopy(ours)
    exact.save = "input"
    for name, a, b in zip(("output", "dx", "dweight", "dbias"), run(exact, x, dy), want):
        close(a, b, 2e-5, f"{name} with save='input'")


# --------------------------------------------------------------------------------------------
# Precision, state, autograd safety
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("act", ["leaky_relu", "silu"])
def test_half_precision_gradients_close_to_float32(half, act):
    ours, _ = make_pair(act)
    x, dy = sample((8, 3, 6, 6), 13).to(half), sample((8, 3, 6, 6), 14).to(half)
    reference = copy.deepcopy(ours)
    got = run(ours, x, dy)
    want = run(reference, x.float(), dy.float())
    tol = {torch.float16: 2e-2, torch.bfloat16: 1e-1}[half]
    assert got[1].dtype == half and got[2].dtype == torch.float32
    for name, a, b in zip(("output", "dx", "dweight", "dbias"), got, want):
        close(a, b, tol * (8 if name == "dweight" else 1), name)
    assert ours.running_mean.dtype == torch.float32


def test_torch_batchnorm_checkpoint_loads_strict_and_round_trips():
    theirs = nn.BatchNorm2d(5)
    with torch.no_grad():
        theirs.weight.uniform_(), theirs.bias.normal_(), theirs.running_var.uniform_(0.5, 2.0)
    theirs.num_batches_tracked.fill_(17)
    ours = BatchNormAct2d(5, act="leaky_relu")
    assert ours.load_state_dict(theirs.state_dict(), strict=True).missing_keys == []
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert isinstance(ours, nn.BatchNorm2d)


def test_split_gives_the_batch_norm_and_the_activation():
    ours, _ = make_pair("elu")
    bn, act = ours.split()
    assert type(bn).__name__ == "BatchNorm2d" and isinstance(act, nn.ELU) and act.alpha == 0.7
    for key, value in bn.state_dict().items():
        assert torch.equal(value, ours.state_dict()[key]), key
    x = sample((4, 3, 5, 5), 15)
    torch.testing.assert_close(act(bn.eval()(x)), ours.eval()(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        ours.running_mean.add_(1.0)  # a copy: changing one leaves the other
    assert not torch.equal(bn.running_mean, ours.running_mean)


def test_modifying_the_output_in_place_is_caught():
    ours, _ = make_pair("leaky_relu")
    x = sample((4, 3, 5, 5), 16).requires_grad_(True)
    y = ours(x)
    y.add_(1.0)  # the saved output changed: recovering x_hat from it would be wrong
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_backward_twice_with_retain_graph_gives_the_same_gradients():
    ours, _ = make_pair("leaky_relu")
    x = sample((4, 3, 5, 5), 17).requires_grad_(True)
    y = ours(x)
    dy = sample((4, 3, 5, 5), 18)
    (g1,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    (g2,) = torch.autograd.grad(y, x, dy)
    assert torch.equal(g1, g2)


def test_nonfinite_batch_leaves_running_stats():
    ours, _ = make_pair("relu")
    before = ours.running_mean.clone(), ours.running_var.clone()
    x = sample((4, 3, 5, 5), 19)
    x[0, 1, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="non-finite statistics"):
        ours(x)
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert int(ours.num_batches_tracked) == 0


def test_single_sample_and_empty_batches_follow_batch_norm():
    ours, theirs = make_pair("relu")
    with pytest.raises(ValueError, match="more than one value per channel"):
        ours(torch.randn(1, 3, 1, 1))
    fallback = BatchNormAct2d(3, act="relu", single_sample="running")
    fallback.load_state_dict(theirs.state_dict())
    x = torch.randn(1, 3, 1, 1)
    close(fallback(x), F.relu(theirs.eval()(x)), 1e-6, "single sample with running statistics")
    assert ours(torch.randn(0, 3, 4, 4)).shape == (0, 3, 4, 4)


def test_eval_under_vmap_runs_unfused_and_matches():
    ours, theirs = make_pair("silu")
    ours.eval(), theirs.eval()
    xs = sample((2, 4, 3, 5, 5), 20)
    got = torch.func.vmap(ours)(xs)
    torch.testing.assert_close(got, torch.stack([F.silu(theirs(x)) for x in xs]), rtol=1e-5, atol=1e-6)


def test_assigning_act_attributes_takes_effect():
    ours, theirs = make_pair("leaky_relu")
    ours.negative_slope = 0.3
    x = sample((4, 3, 5, 5), 21)
    close(ours(x), F.leaky_relu(theirs(x), 0.3), 1e-6, "after negative_slope = 0.3")


def test_repr_names_the_activation():
    assert "act='leaky_relu', negative_slope=0.2" in repr(BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2))
    assert "save='input'" in repr(BatchNormAct2d(4, save="input"))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(act="gelu"), ValueError,
         r"BatchNormAct2d: act must be one of \['identity', 'relu', 'leaky_relu', 'elu', 'silu'\], got 'gelu'"),
        (dict(save="output"), ValueError, r"BatchNormAct2d: save must be one of \['auto', 'input'\], got 'output'"),
        (dict(act="elu", alpha=0.0), ValueError, r"act='elu' needs alpha > 0 \(typically 1.0\), got alpha=0.0"),
        (dict(negative_slope="0.1"), TypeError, r"negative_slope must be a float, got str '0.1'"),
        (dict(momentum=2.0), ValueError, r"momentum must lie in \[0, 1\]"),
    ],
    ids=["act", "save", "elu-alpha", "slope-type", "momentum"],
)
def test_errors_name_the_rule_and_the_value(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNormAct2d(4, **kwargs)


def test_wrong_channel_count_names_the_layer():
    with pytest.raises(ValueError, match=r"BatchNormAct2d\(4\): expected 4 channels in dimension 1, got input of shape \(2, 3, 5, 5\)"):
        BatchNormAct2d(4)(torch.randn(2, 3, 5, 5))


# --------------------------------------------------------------------------------------------
# Masks, gradient accumulation and checkpointing: as normlab's batch norm
# --------------------------------------------------------------------------------------------


def test_mask_gives_batch_norm_over_the_valid_positions_then_the_activation():
    ours = BatchNormAct1d(3, act="elu")
    plain, act = ours.split()
    x = sample((4, 3, 6), 22)
    mask = torch.arange(6) < torch.tensor([6, 2, 4, 5])[:, None]
    y = ours(x, mask)
    close(y, act(plain(x, mask)), 1e-6, "masked output")
    assert torch.equal(y[1, :, 2:], torch.zeros(3, 4))
    close(ours.running_mean, plain.running_mean, 1e-7, "masked running_mean")


def test_accumulate_updates_once_from_the_pooled_micro_batches():
    from normlab.accumulate import accumulate

    ours, theirs = make_pair("leaky_relu")
    batch = sample((12, 3, 4, 4), 23)
    with accumulate(ours):
        for micro in batch.chunk(3):
            ours(micro.requires_grad_(True)).sum().backward()
    theirs(batch)  # one update from the whole batch
    assert int(ours.num_batches_tracked) == 1
    close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
    close(ours.running_var, theirs.running_var, 1e-6, "running_var")


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_checkpoint_recomputation_updates_the_statistics_once(reentrant):
    from torch.utils.checkpoint import checkpoint

    ours, theirs = make_pair("leaky_relu")
    x, dy = sample((6, 3, 4, 4), 24), sample((6, 3, 4, 4), 25)
    xx = x.clone().requires_grad_(True)
    checkpoint(ours, xx, use_reentrant=reentrant).backward(dy)
    want = run(theirs, x, dy, ACTS["leaky_relu"])
    assert int(ours.num_batches_tracked) == 1
    close(ours.running_mean, theirs.running_mean, 1e-6, "running_mean")
    close(xx.grad, want[1], 2e-5, "dx through the checkpoint")


@pytest.mark.slow
def test_compiled_layer_runs_unfused_with_the_same_numbers():
    ours, _ = make_pair("leaky_relu")
    twin = copy.deepcopy(ours)
    compiled = torch.compile(ours, backend="aot_eager")
    x = sample((4, 3, 5, 5), 26)
    torch.testing.assert_close(compiled(x), twin(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.running_mean, twin.running_mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("act, save", [("relu", "auto"), ("leaky_relu", "auto"), ("leaky_relu", "input")])
def test_large_offset_input_keeps_float32_accuracy(act, save):
    """x = 1e4 + N(0, 1): the backward forms x - mean before it multiplies (torch's kernel does);
    recovering from the output never sees the offset. Oracle: the float64 reference."""
    from normlab import reference as R

    ours, _ = make_pair(act, save=save)
    x, dy = sample((8, 3, 6, 6), 27) + 1e4, sample((8, 3, 6, 6), 28)
    _, dx, dw, db = run(ours, x, dy)
    params = dict(weight=to_numpy(ours.weight), bias=to_numpy(ours.bias))
    want = R.batch_norm_act_backward(to_numpy(dy), to_numpy(x), **params, act=act,
                                     negative_slope=0.1)
    for name, a, b in zip(("dx", "dweight", "dbias"), (dx, dw, db), want):
        close(a, torch.as_tensor(b), 1e-4, name)
