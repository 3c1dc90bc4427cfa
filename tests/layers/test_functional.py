"""normlab.functional: purity, torch.func / torch.compile compatibility, and the numerics it promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from device_switch import to_numpy
from torch.func import functional_call, vmap

import normlab
from normlab import functional as NF
from normlab import reference as R


def test_batch_norm_does_not_modify_its_arguments():
    x = torch.randn(6, 3, 4, 4)
    args = dict(running_mean=torch.rand(3), running_var=torch.rand(3) + 0.5,
                weight=torch.rand(3), bias=torch.rand(3), num_batches_tracked=torch.tensor(4))
    before = {k: v.clone() for k, v in args.items()}
    x_before = x.clone()
    result = NF.batch_norm(x, training=True, momentum=0.3, **args)
    for key, value in args.items():
        assert torch.equal(value, before[key]), key
    assert torch.equal(x, x_before)
    assert int(result.num_batches_tracked) == 5
    assert not torch.equal(result.running_mean, before["running_mean"])


def test_instance_norm_does_not_modify_its_arguments():
    x = torch.randn(4, 3, 10)
    rm, rv = torch.rand(3), torch.rand(3) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    result = NF.instance_norm(x, rm, rv, use_input_stats=True, momentum=0.2)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    _, ref_rm, ref_rv = R.instance_norm(to_numpy(x), to_numpy(rm), to_numpy(rv), momentum=0.2)
    np.testing.assert_allclose(to_numpy(result.running_mean), ref_rm, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(result.running_var), ref_rv, rtol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("unbiased", [True, False])
def test_batch_norm_running_stats_match_reference(momentum, unbiased):
    torch.manual_seed(0)
    rm, rv, count = torch.rand(5), torch.rand(5) + 0.5, torch.tensor(2)
    ref = (to_numpy(rm), to_numpy(rv), 2)
    for _ in range(3):
        x = torch.randn(7, 5, 3) * 2 + 1
        out = NF.batch_norm(x, rm, rv, training=True, momentum=momentum,
                            num_batches_tracked=count, unbiased=unbiased)
        y_ref, *ref = R.batch_norm(to_numpy(x), ref[0], ref[1], training=True, momentum=momentum,
                                   num_batches_tracked=ref[2], unbiased=unbiased)
        rm, rv, count = out.running_mean, out.running_var, out.num_batches_tracked
        np.testing.assert_allclose(to_numpy(out.output), y_ref, atol=1e-5)
        np.testing.assert_allclose(to_numpy(rm), ref[0], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(to_numpy(rv), ref[1], rtol=1e-6)
        assert int(count) == ref[2]


def test_momentum_none_needs_a_count():
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        NF.batch_norm(torch.randn(4, 2), torch.zeros(2), torch.ones(2), training=True, momentum=None)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight=torch.ones(3)), r"weight must have shape \(2,\).*got \(3,\)"),
        (dict(running_mean=torch.zeros(2)), "give both running_mean and running_var"),
        (dict(momentum=2.0), r"momentum must lie in \[0, 1\].*got 2.0"),
    ],
)
def test_batch_norm_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NF.batch_norm(torch.randn(4, 2), training=True, **kwargs)


def test_batch_norm_rejects_1d_input():
    with pytest.raises(ValueError, match=r"input must be \(N, C\).*got a 1-D tensor.*unsqueeze"):
        NF.batch_norm(torch.randn(5), training=True)


def test_layer_and_rms_norm_shape_errors():
    with pytest.raises(ValueError, match=r"trailing dimensions must equal normalized_shape=\[4\]"):
        NF.layer_norm(torch.randn(2, 3), 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\), got \(4,\)"):
        NF.rms_norm(torch.randn(2, 3), 3, weight=torch.ones(4))
    with pytest.raises(ValueError, match="must split evenly into num_groups.*num_groups=4.*divisor of 6"):
        NF.group_norm(torch.randn(2, 6, 3), 4)


def test_functional_call_swaps_parameters_and_buffers():
    bn = normlab.BatchNorm2d(3)
    state = {
        "weight": torch.rand(3), "bias": torch.rand(3),
        "running_mean": torch.rand(3), "running_var": torch.rand(3) + 0.5,
        "num_batches_tracked": torch.tensor(0),
    }
    bn.eval()
    x = torch.randn(4, 3, 5, 5)
    y = functional_call(bn, state, (x,))
    ref = R.batch_norm(to_numpy(x), to_numpy(state["running_mean"]), to_numpy(state["running_var"]),
                       to_numpy(state["weight"]), to_numpy(state["bias"]), training=False)[0]
    np.testing.assert_allclose(to_numpy(y), ref, atol=1e-5)


@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (300, 4)])
def test_vmap_over_an_ensemble_in_training(shape):
    # Three models' statistics and three batches, normalized in one vmapped call.
    torch.manual_seed(1)
    xs = torch.randn(3, *shape) * 2 + 1
    rms, rvs = torch.rand(3, 4), torch.rand(3, 4) + 0.5

    def step(x, rm, rv):
        r = NF.batch_norm(x, rm, rv, training=True, momentum=0.2)
        return r.output, r.running_mean, r.running_var

    outs, new_rm, new_rv = vmap(step)(xs, rms, rvs)
    for i in range(3):
        y, rm, rv, _ = R.batch_norm(to_numpy(xs[i]), to_numpy(rms[i]), to_numpy(rvs[i]), training=True, momentum=0.2)
        np.testing.assert_allclose(to_numpy(outs[i]), y, atol=2e-5)
        np.testing.assert_allclose(to_numpy(new_rm[i]), rm, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(to_numpy(new_rv[i]), rv, rtol=1e-5)


def test_torch_compile_traces_batch_norm_without_graph_breaks():
    torch._dynamo.reset()

    def step(x, rm, rv, count):
        r = NF.batch_norm(x, rm, rv, training=True, num_batches_tracked=count)
        return r.output, r.running_mean, r.running_var, r.num_batches_tracked

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 3, 4, 4)
    args = (torch.zeros(3), torch.ones(3), torch.tensor(0))
    for got, want in zip(compiled(x, *args), step(x, *args)):
        torch.testing.assert_close(got, want)


def test_compiled_layer_trains():
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), normlab.BatchNorm1d(6))
    twin = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6))
    twin.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(10, 4)
    torch.testing.assert_close(compiled(x), twin(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var)


@pytest.mark.parametrize("layout", ["2d", "channels_last"])
def test_channel_mean_var_is_exact_to_float32_at_large_offsets(layout):
    torch.manual_seed(0)
    if layout == "2d":
        x = torch.randn(5000, 3, dtype=torch.float64) + 1e5
    else:
        x = (torch.randn(20, 3, 16, 16, dtype=torch.float64) + 1e5).contiguous(memory_format=torch.channels_last)
    mean, var = NF.channel_mean_var(x.float())
    xd = x.float().double()
    dims = [d for d in range(x.dim()) if d != 1]
    true_mean, true_var = xd.mean(dims), xd.var(dims, unbiased=False)
    assert (mean.double() - true_mean).abs().max() < 1e5 * 2**-23 * 4
    assert ((var.double() - true_var) / true_var).abs().max() < 2e-3  # conditioning 1e5: ~eps * 1e5
    assert (var >= 0).all()


def test_half_input_statistics_in_float32():
    torch.manual_seed(0)
    x = (torch.randn(64, 4, 8, 8) * 0.01 + 300).half()  # float16 sums of 4096 such values overflow
    r = NF.batch_norm(x, torch.zeros(4), torch.ones(4), training=True)
    assert r.output.dtype == torch.float16 and torch.isfinite(r.output).all()
    assert r.running_mean.dtype == torch.float32
    true_mean = x.double().mean((0, 2, 3))
    np.testing.assert_allclose(to_numpy(r.running_mean), to_numpy(0.1 * true_mean), rtol=1e-5)


_OTHER_NORMS = {
    "layer_norm": (lambda x: NF.layer_norm(x, 5), lambda x: R.layer_norm(x, 5)),
    "group_norm": (lambda x: NF.group_norm(x, 2), lambda x: R.group_norm(x, 2)),
    "instance_norm": (lambda x: NF.instance_norm(x).output, lambda x: R.instance_norm(x)[0]),
    "rms_norm": (lambda x: NF.rms_norm(x, 5), lambda x: R.rms_norm(x, 5)),
}


@pytest.mark.parametrize("name", sorted(_OTHER_NORMS))
def test_other_norms_under_vmap_and_compile(name):
    torch._dynamo.reset()
    ours, reference = _OTHER_NORMS[name]
    xs = torch.randn(3, 4, 4, 5)  # three (N=4, C=4, L=5) inputs
    batched = vmap(ours)(xs)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)(xs[0])
    for i in range(3):
        np.testing.assert_allclose(to_numpy(batched[i]), reference(to_numpy(xs[i])), atol=2e-5)
    np.testing.assert_allclose(to_numpy(compiled), reference(to_numpy(xs[0])), atol=2e-5)


# --------------------------------------------------------------------------------------------
# The public functions that mirror reference's (issue 12): held against the float64 oracle
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "2d"])
def test_channel_mean_var_matches_reference(layout):
    torch.manual_seed(0)
    x = torch.randn(300, 4, dtype=torch.float64) * 3 + 50 if layout == "2d" else (
        torch.randn(6, 4, 9, 9, dtype=torch.float64) * 3 + 50)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = NF.channel_mean_var(x)
    ref_mean, ref_var = R.channel_mean_var(to_numpy(x))
    np.testing.assert_allclose(to_numpy(mean), ref_mean, rtol=1e-13)
    np.testing.assert_allclose(to_numpy(var), ref_var, rtol=1e-11)


_VARIANTS = {
    "plain": {},
    "mask": {"mask": True},
    "renorm": {"r_max": 1.2, "d_max": 0.3},
    "act": {"act": "leaky_relu", "negative_slope": 0.2},
    "act-mask": {"act": "elu", "alpha": 0.7, "mask": True},
}


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_batch_norm_with_stats_matches_reference(variant):
    torch.manual_seed(1)
    x = torch.randn(6, 3, 5, dtype=torch.float64) * 2 + 1
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    options = dict(_VARIANTS[variant])
    if options.pop("mask", False):
        options["mask"] = torch.rand(6, 5) < 0.6
    ref_options = {k: (v.cpu().numpy() if k == "mask" else v) for k, v in options.items()}
    r = NF.batch_norm_with_stats(x, w, b, 1e-3, running_mean=rm, running_var=rv, **options)
    y, mean, var, n = R.batch_norm_with_stats(to_numpy(x), to_numpy(w), to_numpy(b), 1e-3, running_mean=to_numpy(rm),
                                              running_var=to_numpy(rv), **ref_options)
    np.testing.assert_allclose(to_numpy(r.output), y, atol=1e-12)
    np.testing.assert_allclose(to_numpy(r.mean), mean, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(r.var), var, rtol=1e-12)
    assert r.count == n


@pytest.mark.parametrize("momentum", [0.3, None])
@pytest.mark.parametrize("unbiased", [True, False])
def test_apply_batch_stats_matches_reference(momentum, unbiased):
    rm, rv, count = torch.tensor([0.5, -1.0]), torch.tensor([2.0, 0.5]), torch.tensor(3)
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 0.25])
    r = NF.apply_batch_stats(rm, rv, mean, var, 10, momentum, count, unbiased)
    ref = R.apply_batch_stats(to_numpy(rm), to_numpy(rv), to_numpy(mean), to_numpy(var), 10, momentum, 3, unbiased)
    np.testing.assert_allclose(to_numpy(r.running_mean), ref[0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(r.running_var), ref[1], rtol=1e-6)
    assert int(r.num_batches_tracked) == ref[2] and bool(r.updated)
    # A count as a tensor (statistics pooled across processes): Bessel's correction on the device.
    as_tensor = NF.apply_batch_stats(rm, rv, mean, var, torch.tensor(10.0), momentum, count, unbiased)
    torch.testing.assert_close(as_tensor.running_var, r.running_var)


def test_apply_batch_stats_keeps_the_statistics_of_a_non_finite_batch_and_ignores_an_empty_one():
    rm, rv, count = torch.zeros(2), torch.ones(2), torch.tensor(5)
    bad = NF.apply_batch_stats(rm, rv, torch.tensor([1.0, float("nan")]), torch.ones(2), 4, 0.5, count)
    assert torch.equal(bad.running_mean, rm) and torch.equal(bad.running_var, rv)
    assert int(bad.num_batches_tracked) == 5 and not bool(bad.updated)
    empty = NF.apply_batch_stats(rm, rv, torch.zeros(2), torch.zeros(2), 0, 0.5, count)
    assert empty.updated is None and empty.running_mean is rm and int(empty.num_batches_tracked) == 5


@pytest.mark.parametrize("training", [True, False])
def test_masked_batch_norm_matches_reference(training):
    torch.manual_seed(2)
    x = torch.randn(5, 3, 7, dtype=torch.float64)
    mask = torch.rand(5, 7) < 0.5
    x[~mask.unsqueeze(1).expand_as(x)] = float("nan")  # padding never enters
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    r = NF.masked_batch_norm(x, mask, rm, rv, training=training, momentum=0.3, num_batches_tracked=torch.tensor(1))
    y, ref_rm, ref_rv, ref_count = R.masked_batch_norm(to_numpy(x), mask.cpu().numpy(), to_numpy(rm), to_numpy(rv),
                                                       training=training, momentum=0.3, num_batches_tracked=1)
    np.testing.assert_allclose(to_numpy(r.output), y, atol=1e-12)
    np.testing.assert_allclose(to_numpy(r.running_mean), ref_rm, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(r.running_var), ref_rv, rtol=1e-12)
    assert int(r.num_batches_tracked) == ref_count


@pytest.mark.parametrize("act", ["identity", "relu", "leaky_relu", "elu", "silu"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_matches_reference(act, training):
    torch.manual_seed(3)
    x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    w, b = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64) * 0.1
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    options = dict(act=act, negative_slope=0.2, alpha=0.7)
    r = NF.batch_norm_act(x, rm, rv, w, b, training=training, momentum=0.3,
                          num_batches_tracked=torch.tensor(0), **options)
    y, ref_rm, ref_rv, ref_count = R.batch_norm_act(to_numpy(x), to_numpy(rm), to_numpy(rv), to_numpy(w), to_numpy(b), training=training,
                                                    momentum=0.3, **options)
    np.testing.assert_allclose(to_numpy(r.output), y, atol=1e-12)
    np.testing.assert_allclose(to_numpy(r.running_mean), ref_rm, rtol=1e-12)
    np.testing.assert_allclose(to_numpy(r.running_var), ref_rv, rtol=1e-12)
    assert int(r.num_batches_tracked) == ref_count
    dy = torch.randn_like(x)
    (r.output * dy).sum().backward()
    dx, _, _ = R.batch_norm_act_backward(to_numpy(dy), to_numpy(x), to_numpy(w), to_numpy(b), training=training,
                                         running_mean=to_numpy(rm), running_var=to_numpy(rv), **options)
    np.testing.assert_allclose(to_numpy(x.grad), dx, atol=1e-9)
