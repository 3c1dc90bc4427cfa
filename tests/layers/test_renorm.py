"""BatchRenorm1d/2d/3d (Ioffe 2017): the documented behaviour, against independent oracles.

Oracles: torch.nn.BatchNorm (r_max = 1, d_max = 0 is batch norm), the float64 reference
(:func:`normlab.reference.batch_renorm` and its backward), a plain torch formula with r and d
detached, and values worked out by hand.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from device_switch import to_numpy
from torch import nn
from torch.utils.checkpoint import checkpoint
from variant_helpers import NORMLAB_BN, TORCH_BN, check_16_bit_input, check_state_dict_round_trip, close, forward_backward, kind as rank_of, randomize, sample

import normlab
from normlab import functional as NF
from normlab import reference as R
from normlab.layers.renorm import (
    BatchRenorm1d,
    BatchRenorm2d,
    BatchRenorm3d,
    LinearRamp,
    renorm_schedule,
)

RENORM = {1: BatchRenorm1d, 2: BatchRenorm2d, 3: BatchRenorm3d}


# Shapes and layouts that take each path: torch's kernels (NCHW, small 2-D) and the blocked
# statistics of channel-innermost input with >= 256 values per channel (2-D, channels_last).
SHAPES = [
    ((16, 5), None),
    ((300, 4), None),
    ((6, 3, 7), None),
    ((4, 3, 5, 6), None),
    ((8, 3, 8, 8), torch.channels_last),
    ((3, 2, 3, 4, 5), None),
    ((4, 2, 4, 4, 4), torch.channels_last_3d),
]
SHAPE_IDS = ["NC", "NC-300", "NCL", "NCHW", "NHWC", "NCDHW", "NDHWC"]


# --------------------------------------------------------------------------------------------
# r_max = 1, d_max = 0 is batch norm
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, fmt", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None"])
def test_r_max_1_d_max_0_equals_batch_norm(shape, fmt, momentum):
    """Outputs, gradients and running statistics over train and eval steps equal torch.nn's
    BatchNorm and normlab's BatchNorm given the same state."""
    kind = rank_of(shape)
    ours = randomize(RENORM[kind](shape[1], momentum=momentum, r_max=1.0, d_max=0.0))
    layers = {"torch": TORCH_BN[kind](shape[1], momentum=momentum), "normlab": NORMLAB_BN[kind](shape[1], momentum=momentum)}
    for other in layers.values():
        other.load_state_dict(ours.state_dict())
    for step, training in enumerate([True, True, True, False]):
        x, dy = sample(shape, 10 * step, fmt=fmt), sample(shape, 10 * step + 1, fmt=fmt)
        ours.train(training)
        y, g = forward_backward(ours, x, dy)
        for name, other in layers.items():
            other.train(training)
            y_o, g_o = forward_backward(other, x, dy)
            when = f"{name}, step {step + 1} ({'train' if training else 'eval'})"
            # torch sums channel-innermost input of >= 256 values per channel naively, normlab
            # (BatchNorm and BatchRenorm alike) by blocks: against torch, allow its rounding.
            base = 1e-5 if name == "torch" and x.stride(1) == 1 and x.numel() / shape[1] >= 256 else 1e-6
            close(y, y_o, base, f"output vs {when}")
            for key in g_o:
                # parameter gradients are sums over N * spatial values: rounding grows with sqrt
                tol = base if key == "input" else base * np.sqrt(x.numel() / shape[1])
                close(g[key], g_o[key], tol, f"d{key} vs {when}")
            close(ours.running_mean, other.running_mean, 1e-6, f"running_mean vs {when}")
            close(ours.running_var, other.running_var, 1e-6, f"running_var vs {when}")
            assert int(ours.num_batches_tracked) == int(other.num_batches_tracked), when


def test_r_max_1_d_max_0_double_backward_equals_torch():
    for shape, fmt in [((6, 3, 5, 5), None), ((8, 3, 8, 8), torch.channels_last)]:
        ours = randomize(BatchRenorm2d(3, r_max=1.0, d_max=0.0, dtype=torch.float64))
        theirs = nn.BatchNorm2d(3, dtype=torch.float64)
        theirs.load_state_dict(ours.state_dict())
        x = sample(shape, 5, torch.float64, fmt)
        results = []
        for layer in (ours, theirs):
            xx = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(layer(xx).pow(3).sum(), xx, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), xx)
            results.append(gg)
        close(results[0], results[1], 1e-10, f"second-order gradient, {shape} {fmt}")


# --------------------------------------------------------------------------------------------
# Corrections in force: the float64 reference, a detached torch formula, hand-worked values
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, fmt", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("limits", [(3.0, 5.0), (1.2, 0.3)], ids=["r3-d5", "r1.2-d0.3"])
def test_matches_reference_with_corrections(shape, fmt, dtype, limits):
    """Over three training steps and one eval step: output, gradients (r, d constant) and
    running statistics against the float64 reference, unclipped and clipped corrections."""
    r_max, d_max = limits
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    layer = randomize(RENORM[rank_of(shape)](shape[1], r_max=r_max, d_max=d_max, dtype=dtype))
    for step, training in enumerate([True, True, True, False]):
        layer.train(training)
        rm, rv, count = to_numpy(layer.running_mean), to_numpy(layer.running_var), int(layer.num_batches_tracked)
        w, b = to_numpy(layer.weight), to_numpy(layer.bias)
        x, dy = sample(shape, 100 + step, dtype, fmt), sample(shape, 200 + step, dtype, fmt)
        y_ref, rm_ref, rv_ref, count_ref = R.batch_renorm(
            to_numpy(x), rm, rv, w, b, training=training, eps=layer.eps, r_max=r_max, d_max=d_max,
            num_batches_tracked=count,
        )
        dx_ref, dw_ref, db_ref = R.batch_renorm_backward(
            to_numpy(dy), to_numpy(x), rm, rv, w, layer.eps, r_max=r_max, d_max=d_max, training=training,
        )
        y, g = forward_backward(layer, x, dy)
        when = f"step {step + 1}"
        close(y, y_ref, tol, f"output, {when}")
        close(g["input"], dx_ref, tol, f"dx, {when}")
        n = x.numel() / shape[1]
        close(g["weight"], dw_ref, tol * np.sqrt(n), f"dweight, {when}")
        close(g["bias"], db_ref, tol * np.sqrt(n), f"dbias, {when}")
        close(layer.running_mean, rm_ref, tol, f"running_mean, {when}")
        close(layer.running_var, rv_ref, tol, f"running_var, {when}")
        assert int(layer.num_batches_tracked) == count_ref


def _detached_formula(x, w, b, rm, rv, eps, r_max, d_max, detach=True):
    """Batch renorm written out in torch ops: the oracle for what is held constant."""
    dims = [0] + list(range(2, x.dim()))
    view = (1, -1) + (1,) * (x.dim() - 2)
    mean = x.mean(dims)
    sigma_b = torch.sqrt(x.var(dims, unbiased=False) + eps)
    sigma = torch.sqrt(rv + eps)
    r = torch.clamp(sigma_b / sigma, 1 / r_max, r_max)
    d = torch.clamp((mean - rm) / sigma, -d_max, d_max)
    if detach:
        r, d = r.detach(), d.detach()
    x_hat = (x - mean.view(view)) / sigma_b.view(view)
    return w.view(view) * (x_hat * r.view(view) + d.view(view)) + b.view(view)


def test_r_and_d_are_constants_in_backprop():
    """The gradient is the detached formula's, and (on purpose) not the full derivative."""
    layer = randomize(BatchRenorm2d(3, r_max=3.0, d_max=5.0, dtype=torch.float64))
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    x = sample((5, 3, 4, 4), 7, torch.float64)
    dy = sample((5, 3, 4, 4), 8, torch.float64)
    y, g = forward_backward(layer, x, dy)
    grads = {}
    for detach in (True, False):
        xx = x.clone().requires_grad_(True)
        w = layer.weight.detach().clone().requires_grad_(True)
        b = layer.bias.detach().clone().requires_grad_(True)
        out = _detached_formula(xx, w, b, rm, rv, layer.eps, 3.0, 5.0, detach)
        grads[detach] = torch.autograd.grad(out, (xx, w, b), dy)
        if detach:
            close(y, out, 1e-12, "output vs the torch formula")
    for got, want, name in zip((g["input"], g["weight"], g["bias"]), grads[True], ("dx", "dweight", "dbias")):
        close(got, want, 1e-12, f"{name} vs the formula with r, d detached")
    assert float((g["input"] - grads[False][0]).abs().max()) > 1e-3, "r and d were differentiated"


def test_clipping_by_hand():
    """Batch mean 2 and std 1 (eps=1e-12, negligible) against running mean 0, variance 4 (sigma 2):
    sigma_B / sigma = 0.5 and (mu_B - mu) / sigma = 1."""
    x = torch.tensor([[1.0], [3.0]])
    x_hat = torch.tensor([-1.0, 1.0])
    for r_max, d_max, r, d in [(3.0, 5.0, 0.5, 1.0), (1.5, 0.25, 1 / 1.5, 0.25), (1.0, 0.0, 1.0, 0.0)]:
        layer = BatchRenorm1d(1, eps=1e-12, r_max=r_max, d_max=d_max)
        with torch.no_grad():
            layer.running_var.fill_(4.0)
            layer.weight.fill_(2.0)
            layer.bias.fill_(0.5)
        y = layer(x).squeeze(1)
        torch.testing.assert_close(y, 2.0 * (x_hat * r + d) + 0.5, rtol=1e-6, atol=1e-6)
        # the running statistics move as batch norm's: towards mean 2, unbiased variance 2
        torch.testing.assert_close(layer.running_mean, torch.tensor([0.2]))
        torch.testing.assert_close(layer.running_var, torch.tensor([0.9 * 4.0 + 0.1 * 2.0]))


def test_unclipped_renorm_in_training_equals_eval_transform():
    """With limits too wide to clip, the training output is the running-statistics transform
    (the point of renorm: training and inference agree)."""
    layer = randomize(BatchRenorm2d(3, r_max=1e6, d_max=1e6, dtype=torch.float64))
    x = sample((6, 3, 5, 5), 3, torch.float64)
    expected = copy.deepcopy(layer).eval()(x)
    close(layer.train()(x), expected, 1e-10, "training output vs eval output")


def test_eval_is_batch_norm_with_running_statistics():
    ours = randomize(BatchRenorm2d(3, r_max=3.0, d_max=5.0)).eval()
    theirs = nn.BatchNorm2d(3).eval()
    theirs.load_state_dict(ours.state_dict())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    x = sample((4, 3, 5, 5), 1)
    close(ours(x), theirs(x), 1e-6, "eval output")
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_without_running_statistics_it_is_batch_norm():
    ours = randomize(BatchRenorm2d(3, track_running_stats=False, r_max=3.0, d_max=5.0))
    theirs = nn.BatchNorm2d(3, track_running_stats=False)
    theirs.load_state_dict(ours.state_dict())
    x, dy = sample((4, 3, 5, 5), 2), sample((4, 3, 5, 5), 3)
    for training in (True, False):
        ours.train(training), theirs.train(training)
        (y, g), (y_t, g_t) = forward_backward(ours, x, dy), forward_backward(theirs, x, dy)
        close(y, y_t, 1e-6, "output")
        for key in g:
            close(g[key], g_t[key], 1e-5, f"d{key}")


# --------------------------------------------------------------------------------------------
# State dicts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_state_dict_is_a_batch_norm_state_dict(kind):
    check_state_dict_round_trip(RENORM[kind](4), kind)


def test_layer_with_a_schedule_pickles_and_deepcopies():
    layer = BatchRenorm2d(3, **renorm_schedule(warmup_steps=10, r_max_at=50, d_max_at=30))
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    assert restored.r_max == layer.r_max and restored.d_max == layer.d_max
    assert copy.deepcopy(layer).limits(20) == layer.limits(20)
    assert pickle.loads(pickle.dumps(layer.r_max)) == layer.r_max


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


def test_paper_schedule_values():
    s = renorm_schedule()
    r, d = s["r_max"], s["d_max"]
    assert (r.start, r.end, r.begin, r.finish) == (1.0, 3.0, 5000, 40000)
    assert (d.start, d.end, d.begin, d.finish) == (0.0, 5.0, 5000, 25000)
    assert [r(k) for k in (0, 4999, 5000, 22500, 40000, 90000)] == [1.0, 1.0, 1.0, 2.0, 3.0, 3.0]
    assert [d(k) for k in (0, 5000, 10000, 25000, 30000)] == [0.0, 0.0, 1.25, 5.0, 5.0]


def test_linear_ramp_on_a_tensor_step_equals_the_int_step():
    ramp = LinearRamp(0.5, 2.5, 10, 30)
    for step in (0, 10, 17, 30, 45):
        assert abs(float(ramp(torch.tensor(step))) - ramp(step)) < 1e-6


def test_default_is_the_paper_schedule_evaluated_at_num_batches_tracked():
    layer = BatchRenorm2d(3)
    assert layer.r_max == renorm_schedule()["r_max"] and layer.d_max == renorm_schedule()["d_max"]
    assert layer.limits() == (1.0, 0.0)
    layer.num_batches_tracked.fill_(22500)
    assert layer.limits() == (2.0, 4.375)


def test_schedule_decides_the_corrections_step_by_step():
    """A schedule at 1 / 0 until step 2 makes the first two steps batch norm; from step 2 on the
    layer follows the reference with the schedule's values at its count."""
    schedule = dict(r_max=LinearRamp(1.0, 2.0, 2, 4), d_max=LinearRamp(0.0, 1.0, 2, 4))
    ours = randomize(BatchRenorm1d(3, **schedule, dtype=torch.float64))
    ours.num_batches_tracked.zero_()
    theirs = nn.BatchNorm1d(3, dtype=torch.float64)
    theirs.load_state_dict(ours.state_dict())
    for step in range(6):
        x = sample((8, 3), 50 + step, torch.float64) * 3
        r_max, d_max = schedule["r_max"](step), schedule["d_max"](step)
        expected = R.batch_renorm(to_numpy(x), to_numpy(ours.running_mean), to_numpy(ours.running_var), to_numpy(ours.weight),
                                  to_numpy(ours.bias), training=True, eps=ours.eps, r_max=r_max, d_max=d_max)[0]
        y, y_bn = ours(x), theirs(x)
        close(y, expected, 1e-10, f"output at step {step}")
        same_as_bn = float((y - y_bn).detach().abs().max()) < 1e-10
        assert same_as_bn == (step < 3), f"step {step}: r_max={r_max}, d_max={d_max}"


def test_callable_schedule_gets_the_count():
    seen = []

    def r_schedule(step):
        seen.append(step)
        return 1.0 + step

    layer = BatchRenorm1d(2, r_max=r_schedule, d_max=0.5)
    for _ in range(3):
        layer(torch.randn(4, 2))
    layer.eval()(torch.randn(4, 2))  # eval: no schedule needed
    assert seen == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# Edges: errors, empty and non-finite batches, gradient accumulation, checkpointing, paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, error, match",
    [
        (dict(r_max=0.5), ValueError, r"BatchRenorm2d: r_max must be >= 1 \(r_max = 1 turns the correction off\), got 0.5"),
        (dict(d_max=-1.0), ValueError, r"BatchRenorm2d: d_max must be >= 0 .*got -1.0"),
        (dict(r_max="3"), TypeError, r"r_max must be a number >= 1 or a schedule .*got str '3'"),
        (dict(d_max=None), TypeError, r"d_max must be a number >= 0 or a schedule .*got NoneType None"),
        (dict(momentum=2.0), ValueError, r"momentum must lie in \[0, 1\]"),
        (dict(eps=-1.0), ValueError, r"eps must be a finite number > 0"),
    ],
    ids=["r_max", "d_max", "r_max-type", "d_max-type", "momentum", "eps"],
)
def test_bad_constructor_arguments(kw, error, match):
    with pytest.raises(error, match=match):
        BatchRenorm2d(3, **kw)


def test_bad_schedule_value_names_layer_value_and_step():
    layer = BatchRenorm1d(2, r_max=lambda step: 0.5, d_max=1.0)
    with pytest.raises(ValueError, match=r"BatchRenorm1d\(2\): the r_max schedule .* returned 0.5 at step 0; it must return a number >= 1"):
        layer(torch.randn(4, 2))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(start=1.0, end=3.0, begin=10, finish=5), r"finish .* must be >= begin, got begin=10, finish=5"),
        (dict(start=1.0, end=3.0, begin=-1, finish=5), r"begin must be an int >= 0 \(a training step\), got -1"),
        (dict(start=1.0, end=float("nan"), begin=0, finish=5), r"end must be a finite number, got nan"),
    ],
    ids=["order", "negative", "nan"],
)
def test_bad_linear_ramp(kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        LinearRamp(**kw)


def test_functional_checks_limits():
    with pytest.raises(ValueError, match=r"batch_renorm: r_max must be >= 1"):
        NF.batch_renorm(torch.randn(4, 2), torch.zeros(2), torch.ones(2), training=True, r_max=0.9)


def test_wrong_rank_and_channels():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        BatchRenorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"BatchRenorm2d\(3\): expected 3 channels in dimension 1, got input of shape \(2, 4, 5, 5\)"):
        BatchRenorm2d(3)(torch.randn(2, 4, 5, 5))


def test_single_value_per_channel():
    layer = BatchRenorm1d(4, r_max=3.0, d_max=5.0)
    with pytest.raises(ValueError, match=r"BatchRenorm1d\(4\): training needs more than one value per channel.*drop_last"):
        layer(torch.randn(1, 4))
    layer = randomize(BatchRenorm1d(4, single_sample="running", r_max=3.0, d_max=5.0))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(1, 4)
    close(layer(x), copy.deepcopy(layer).eval()(x), 1e-6, "single sample with running statistics")
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_empty_batch_leaves_state():
    layer = randomize(BatchRenorm2d(3, r_max=3.0, d_max=5.0))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    assert y.shape == x.shape
    assert torch.equal(layer.weight.grad, torch.zeros(3)) and torch.equal(layer.bias.grad, torch.zeros(3))
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_nonfinite_batch_leaves_running_statistics():
    layer = randomize(BatchRenorm2d(3, r_max=3.0, d_max=5.0))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 3, 5, 5)
    x[1, 2, 0, 0] = float("nan")
    with pytest.warns(normlab.NonFiniteStatisticsWarning, match=r"BatchRenorm2d\(3\)"):
        layer(x)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(layer.num_batches_skipped) == 1


def test_large_offset_channels_stay_accurate():
    """A channel at 1e4 with unit spread: torch's fused kernel would lose ~10 bits; the layer
    falls back to subtract-first statistics and normalization, as normlab's BatchNorm does."""
    x64 = sample((16, 3, 6, 6), 4, torch.float64) + 1e4
    layer = randomize(BatchRenorm2d(3, r_max=3.0, d_max=5.0))
    with torch.no_grad():
        layer.running_mean.fill_(1e4)
    expected = R.batch_renorm(to_numpy(x64), to_numpy(layer.running_mean), to_numpy(layer.running_var), to_numpy(layer.weight),
                              to_numpy(layer.bias), training=True, eps=layer.eps, r_max=3.0, d_max=5.0)[0]
    close(layer(x64.float()), expected, 2e-4, "output of an offset batch")


def test_fast_path_serves_contiguous_float32():
    """A guard for speed: NCHW float32 input runs on torch's kernels (benchmarks/bench_variants.py)."""
    y = BatchRenorm2d(3, r_max=3.0, d_max=5.0)(torch.randn(4, 3, 5, 5, requires_grad=True))
    assert type(y.grad_fn).__name__ == "_NormalizeWithStatsBackward"


def test_half_precision_input_uses_float32_statistics():
    check_16_bit_input(randomize(BatchRenorm2d(3, r_max=3.0, d_max=5.0)), sample((4, 3, 6, 6), 9).to(torch.bfloat16),
                       5e-2)


def test_vmap_over_batches_equals_a_loop():
    xs = sample((3, 8, 4, 5), 11)
    rm, rv = torch.randn(4) * 0.3, torch.rand(4) + 0.5

    def f(x):
        return NF.batch_renorm(x, rm, rv, training=True, r_max=2.0, d_max=1.0,
                               num_batches_tracked=torch.tensor(0)).output

    close(torch.func.vmap(f)(xs), torch.stack([f(x) for x in xs]), 1e-6, "vmap vs loop")


def test_functional_does_not_modify_its_arguments():
    args = dict(running_mean=torch.rand(3), running_var=torch.rand(3) + 0.5, weight=torch.rand(3),
                bias=torch.rand(3), num_batches_tracked=torch.tensor(4))
    before = {k: v.clone() for k, v in args.items()}
    result = NF.batch_renorm(torch.randn(6, 3, 4, 4), training=True, r_max=2.0, d_max=1.0, **args)
    for key, value in args.items():
        assert torch.equal(value, before[key]), key
    assert int(result.num_batches_tracked) == 5


def test_accumulate_updates_once_from_the_pooled_batch():
    """Inside normlab.accumulate each micro-batch is corrected towards the running statistics as
    they stand, and the statistics move once, as from the concatenated batch."""
    from normlab.accumulate import accumulate

    layer = randomize(BatchRenorm2d(3, r_max=2.0, d_max=1.0, dtype=torch.float64))
    start = copy.deepcopy(layer)
    batch = sample((8, 3, 4, 4), 21, torch.float64)
    with accumulate(layer):
        outs = [layer(micro) for micro in batch.chunk(4)]
    for micro, out in zip(batch.chunk(4), outs):
        close(out, copy.deepcopy(start)(micro), 1e-12, "micro-batch output")
    full = copy.deepcopy(start)
    full(batch)
    close(layer.running_mean, full.running_mean, 1e-12, "running_mean")
    close(layer.running_var, full.running_var, 1e-12, "running_var")
    assert int(layer.num_batches_tracked) == int(start.num_batches_tracked) + 1


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_updates_running_statistics_once(use_reentrant):
    layer = randomize(BatchRenorm2d(3, r_max=2.0, d_max=1.0))
    plain = copy.deepcopy(layer)
    x = sample((4, 3, 5, 5), 31).requires_grad_(True)
    checkpoint(layer, x, use_reentrant=use_reentrant).square().sum().backward()
    plain(x)
    for key, value in plain.state_dict().items():
        assert torch.equal(layer.state_dict()[key], value), key


def test_limits_as_tensors_equal_limits_as_numbers():
    """A schedule's value on an accelerator arrives as a 0-dim tensor (no host synchronization)."""
    x = sample((6, 3, 4, 4), 12)
    rm, rv = torch.randn(3) * 0.5, torch.rand(3) + 0.5
    as_numbers = NF.batch_renorm(x, rm, rv, training=True, r_max=1.5, d_max=0.4).output
    as_tensors = NF.batch_renorm(x, rm, rv, training=True, r_max=torch.tensor(1.5), d_max=torch.tensor(0.4)).output
    torch.testing.assert_close(as_tensors, as_numbers, rtol=0, atol=1e-6)
