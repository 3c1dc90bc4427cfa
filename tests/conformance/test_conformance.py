"""Generic checks that every layer in ``cases.CASES`` passes.

Oracles: the float64 NumPy reference (:mod:`normlab.reference`, through the case's adapters),
``torch.nn`` given the same state dict, and ``torch.autograd.gradcheck``. normlab is compared
with itself only for documented equivalences: channels_last vs contiguous, a state-dict
round-trip, 16-bit vs float32 input.
"""

from __future__ import annotations

import copy
import io
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import normlab

from .cases import (
    CASES,
    LayerCase,
    Shape,
    cases_where,
    randomize_,
    sample_input,
    seed_of,
    snapshot,
    to_numpy,
)

F32_TOL = 1e-5  # float32 layer vs float64 reference, relative to max(1, |expected|)
F64_TOL = 1e-10  # float64 layer vs float64 reference
TORCH_TOL = 1e-6  # normlab vs torch.nn, both float32
LAYOUT_TOL = 1e-6  # channels_last vs contiguous, float32
HALF_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
TOL = {torch.float32: F32_TOL, torch.float64: F64_TOL}
PARAMS = ("weight", "bias")


def ids(cases: list[LayerCase]) -> list[str]:
    return [c.name for c in cases]


def over(cases: list[LayerCase] | tuple[LayerCase, ...]):
    """Parametrize a test over cases, with readable ids."""
    return pytest.mark.parametrize("case", list(cases), ids=ids(list(cases)))


modes = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
float_dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def max_error(actual, expected) -> tuple[float, float]:
    """``(max |actual - expected|, max(1, max |expected|))`` as floats; shapes must agree."""
    a = to_numpy(actual) if isinstance(actual, torch.Tensor) else np.asarray(actual, np.float64)
    e = to_numpy(expected) if isinstance(expected, torch.Tensor) else np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    assert np.isfinite(a).all(), "non-finite values"
    if a.size == 0:
        return 0.0, 1.0
    return float(np.abs(a - e).max()), max(1.0, float(np.abs(e).max()))


def assert_close(actual, expected, tol: float, what: str) -> None:
    """``max |actual - expected| <= tol * max(1, max |expected|)`` (unit-scale tolerance)."""
    err, scale = max_error(actual, expected)
    assert err <= tol * scale, f"{what}: max abs error {err:.3g} > {tol:g} * {scale:.3g}"


def values_per_param(layer: nn.Module, x: torch.Tensor, name: str) -> int:
    """How many values the gradient of one element of parameter ``name`` sums over."""
    return max(1, x.numel() // max(1, getattr(layer, name).numel()))


def grad_tol(base: float, layer: nn.Module, x: torch.Tensor, name: str) -> float:
    """Tolerance for a gradient: ``base`` for the input's, ``base * sqrt(n)`` for a parameter's.

    A weight or bias gradient is a float32 sum over n values; two correct kernels that sum in a
    different order (NCHW vs channels_last, torch vs normlab's blocked path) differ by about
    sqrt(n) rounding errors of the terms, which can also cancel (sum(dy * x_hat)).
    """
    return base if name == "input" else base * math.sqrt(values_per_param(layer, x, name))


def build(case: LayerCase, shape: Shape, dtype=torch.float32, **kw) -> nn.Module:
    """The case's normlab layer with seeded non-trivial parameters and statistics."""
    return randomize_(case.make(shape, dtype=dtype, **kw), seed_of(case.name, shape))


def running_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the buffers that training may move."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    return {k: getattr(layer, k).clone() for k in names if getattr(layer, k, None) is not None}


def param_grads(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: getattr(layer, k).grad for k in PARAMS if getattr(layer, k, None) is not None}


def run_with_grads(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    """Forward and backward with upstream gradient ``dy``: ``(y, {"input", "weight", "bias"})``."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(dy)
    return y.detach(), {"input": x.grad, **param_grads(layer)}


def assert_stats_match_reference(layer: nn.Module, expected, tol: float, when: str) -> None:
    assert_close(layer.running_mean, expected.running_mean, tol, f"running_mean {when}")
    assert_close(layer.running_var, expected.running_var, tol, f"running_var {when}")
    if expected.num_batches_tracked is not None:
        assert int(layer.num_batches_tracked) == expected.num_batches_tracked, f"count {when}"


def channels_last_format(ndim: int) -> torch.memory_format:
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


# --------------------------------------------------------------------------------------------
# 1-3. Forward, gradients and running statistics against the float64 reference
# --------------------------------------------------------------------------------------------


@over(CASES)
@float_dtypes
@modes
def test_forward_matches_reference(case: LayerCase, dtype, training):
    for shape in case.shapes:
        layer = build(case, shape, dtype).train(training)
        x = sample_input(shape, seed_of("x", case.name, shape), dtype)
        expected = case.forward(snapshot(layer, dtype), to_numpy(x), training)
        y = layer(x)
        assert y.dtype == dtype and y.shape == x.shape
        assert_close(y, expected.y, TOL[dtype], f"output for input {shape}")


@over(CASES)
@float_dtypes
@modes
def test_gradients_match_reference(case: LayerCase, dtype, training):
    for shape in case.shapes:
        layer = build(case, shape, dtype).train(training)
        x = sample_input(shape, seed_of("x", case.name, shape), dtype)
        dy = sample_input(shape, seed_of("dy", case.name, shape), dtype)
        expected = case.backward(snapshot(layer, dtype), to_numpy(x), to_numpy(dy), training)
        _, grads = run_with_grads(layer, x, dy)
        assert set(grads) == set(expected), "the layer's parameters differ from the reference's"
        for name, grad in grads.items():
            assert grad is not None, f"no gradient for {name}"
            assert_close(grad, expected[name], TOL[dtype], f"d{name} for input {shape}")


@over(cases_where(lambda c: c.has_running_stats))
@float_dtypes
def test_running_stats_follow_reference(case: LayerCase, dtype):
    shape = case.shapes[0]
    layer = build(case, shape, dtype).train()
    state = snapshot(layer, dtype)
    for step in range(3):
        x = sample_input(shape, seed_of("step", case.name, step), dtype)
        expected = case.forward(state, to_numpy(x), True)
        layer(x)
        assert_stats_match_reference(layer, expected, TOL[dtype], f"after training step {step + 1}")
        state = state.after(expected)
    if case.counts_batches:
        assert int(layer.num_batches_tracked) == 4 + 3  # randomize_ starts the count at 4

    layer.eval()
    frozen = running_state(layer)
    for step in range(2):
        layer(sample_input(shape, seed_of("eval", case.name, step), dtype))
    for name, value in frozen.items():
        assert torch.equal(getattr(layer, name), value), f"{name} moved in eval mode"


# --------------------------------------------------------------------------------------------
# 4. Same numbers as torch.nn given the same state dict
# --------------------------------------------------------------------------------------------


@over(cases_where(lambda c: c.has_torch))
def test_matches_torch_over_steps(case: LayerCase):
    for shape in case.shapes:
        ours = build(case, shape)
        theirs = case.make_torch(shape)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        for step, training in enumerate([True, True, True, False, False]):
            ours.train(training), theirs.train(training)
            x = sample_input(shape, seed_of("x", case.name, shape, step))
            dy = sample_input(shape, seed_of("dy", case.name, shape, step))
            y_ours, g_ours = run_with_grads(ours, x, dy)
            y_theirs, g_theirs = run_with_grads(theirs, x, dy)
            when = f"input {shape}, step {step + 1} ({'train' if training else 'eval'})"
            assert_close(y_ours, y_theirs, TORCH_TOL, f"output, {when}")
            assert set(g_ours) == set(g_theirs)
            for name in g_theirs:
                tol = grad_tol(TORCH_TOL, ours, x, name)
                assert_close(g_ours[name], g_theirs[name], tol, f"d{name}, {when}")
            for name, value in running_state(theirs).items():
                if name == "num_batches_tracked":
                    assert torch.equal(getattr(ours, name), value), f"{name}, {when}"
                else:
                    assert_close(getattr(ours, name), value, TORCH_TOL, f"{name}, {when}")


@over(cases_where(lambda c: c.has_torch))
def test_double_backward_matches_torch(case: LayerCase):
    """Second-order gradients (gradient penalties, meta-learning) equal torch's."""
    for shape in case.shapes:
        ours = build(case, shape, torch.float64)
        theirs = case.make_torch(shape, dtype=torch.float64)
        theirs.load_state_dict(ours.state_dict())
        x = sample_input(shape, seed_of("x2", case.name, shape), torch.float64)
        results = []
        for layer in (ours, theirs):
            xx = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(layer(xx).pow(3).sum(), xx, create_graph=True)
            (gg,) = torch.autograd.grad(g.pow(2).sum(), xx)
            results.append(gg)
        assert_close(results[0], results[1], 1e-10, f"second-order gradient for input {shape}")


# --------------------------------------------------------------------------------------------
# 5. State dict: keys, round-trip, cross-loading, version-1 checkpoints
# --------------------------------------------------------------------------------------------


@over(cases_where(lambda c: c.has_torch))
def test_state_dict_keys_match_torch(case: LayerCase):
    shape = case.shapes[0]
    ours, theirs = case.make(shape).state_dict(), case.make_torch(shape).state_dict()
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
    assert ours._metadata[""] == theirs._metadata[""], "state-dict version differs from torch's"


@over(CASES)
def test_state_dict_round_trip(case: LayerCase):
    shape = case.shapes[0]
    original = build(case, shape)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = case.make(shape)
    restored.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    for step, training in enumerate([False, True, False]):
        x = sample_input(shape, seed_of("rt", case.name, step))
        original.train(training), restored.train(training)
        assert torch.equal(original(x), restored(x)), f"outputs differ at step {step + 1}"
    for key, value in original.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@over(cases_where(lambda c: c.has_torch))
def test_state_dict_cross_loads_with_torch(case: LayerCase):
    shape = case.shapes[0]
    ours = build(case, shape)
    theirs = case.make_torch(shape)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), f"normlab -> torch: {key}"

    theirs = randomize_(case.make_torch(shape), seed_of("torch", case.name))
    ours = case.make(shape)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), f"torch -> normlab: {key}"


def version1_checkpoint(layer: nn.Module) -> dict:
    """``layer``'s state dict as torch wrote it before num_batches_tracked existed (version 1)."""
    checkpoint = layer.state_dict()
    del checkpoint["num_batches_tracked"]
    checkpoint._metadata[""]["version"] = 1
    return checkpoint


@over(cases_where(lambda c: c.has_torch and c.has_running_stats))
def test_version1_checkpoint_loads_with_zero_count(case: LayerCase):
    shape = case.shapes[0]
    theirs = randomize_(case.make_torch(shape), seed_of("v1", case.name))
    ours = case.make(shape)
    ours.load_state_dict(version1_checkpoint(theirs), strict=True)
    assert int(ours.num_batches_tracked) == 0
    assert torch.equal(ours.running_mean, theirs.running_mean)
    assert torch.equal(ours.running_var, theirs.running_var)


@over(cases_where(lambda c: c.has_torch and c.has_running_stats))
def test_version1_checkpoint_into_used_layer_counts_like_torch(case: LayerCase):
    """torch keeps the *loading* layer's count for a version-1 checkpoint (not 0, despite its
    own comment "this should have a default value of 0"); normlab does what torch does."""
    shape = case.shapes[0]
    checkpoint = version1_checkpoint(randomize_(case.make_torch(shape), seed_of("v1", case.name)))
    ours, theirs = build(case, shape), case.make_torch(shape)  # both count 4 before loading
    theirs.load_state_dict(build(case, shape).state_dict())
    ours.load_state_dict(copy.deepcopy(checkpoint), strict=True)
    theirs.load_state_dict(copy.deepcopy(checkpoint), strict=True)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


# --------------------------------------------------------------------------------------------
# 6. gradcheck in float64
# --------------------------------------------------------------------------------------------


@over(CASES)
@modes
def test_gradcheck(case: LayerCase, training):
    shape = case.gradcheck_shape
    layer = build(case, shape, torch.float64).train(training)
    names = [k for k in PARAMS if getattr(layer, k, None) is not None]
    params = [getattr(layer, k).detach().clone().requires_grad_(True) for k in names]
    x = sample_input(shape, seed_of("gc", case.name), torch.float64).requires_grad_(True)

    def f(x, *values):
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# 7. float16 / bfloat16
# --------------------------------------------------------------------------------------------


half_dtypes = pytest.mark.parametrize("half", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])


@over(CASES)
@half_dtypes
@modes
@pytest.mark.parametrize("convert", [False, True], ids=["f32-layer", "converted-layer"])
def test_half_precision_input(case: LayerCase, half, training, convert, request):
    """16-bit input: output in the input's dtype, close to float32; statistics stay float32."""
    shape = case.shapes[0]
    x16 = sample_input(shape, seed_of("half", case.name), half)
    ref_layer = build(case, shape).train(training)  # float32 layer on the same (rounded) values
    layer = copy.deepcopy(ref_layer)
    if convert:
        layer = layer.to(half)
    expected = ref_layer(x16.float())
    y = layer(x16)
    assert y.dtype == half
    assert torch.isfinite(y).all()
    assert_close(y, expected, HALF_TOL[half], f"{half} output vs float32")
    if case.has_running_stats:
        for name in ("running_mean", "running_var"):
            stat = getattr(layer, name)
            assert stat.dtype == torch.float32, f"{name} became {stat.dtype}"
            # Statistics accumulated in float32 from the same 16-bit values: float32 agreement.
            assert_close(stat, getattr(ref_layer, name), 1e-5, f"{name} after a {half} batch")


# --------------------------------------------------------------------------------------------
# 8. Empty batch
# --------------------------------------------------------------------------------------------


@over(CASES)
@modes
def test_empty_batch(case: LayerCase, training):
    shape = (0,) + case.shapes[0][1:]
    x = torch.randn(shape)
    layer = build(case, case.shapes[0]).train(training)
    before = running_state(layer)
    if case.empty_batch == "error":
        with pytest.raises(ValueError, match="empty"):
            layer(x)
        return
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    # normlab: nothing moves, num_batches_tracked included (torch increments the count).
    for name, value in before.items():
        assert torch.equal(getattr(layer, name), value), f"{name} changed on an empty batch"

    theirs = case.make_torch(case.shapes[0])
    if theirs is None:
        return
    theirs.load_state_dict(build(case, case.shapes[0]).state_dict())
    theirs.train(training)
    torch_before = running_state(theirs)
    try:
        y_theirs = theirs(x)
    except Exception as exc:  # torch fails on some empty inputs: normlab's answer stands alone
        print(f"torch.nn {case.name} fails on an empty batch: {type(exc).__name__}: {exc}")
        return
    assert y_theirs.shape == y.shape
    for name in ("running_mean", "running_var"):
        if name not in torch_before:
            continue
        if not torch.equal(getattr(theirs, name), torch_before[name]):
            # torch's InstanceNorm with running statistics and affine=False sets them to NaN.
            print(f"torch.nn {case.name} changes {name} on an empty batch: {getattr(theirs, name)}")
        else:
            assert torch.equal(getattr(layer, name), getattr(theirs, name))


@pytest.mark.parametrize("case", cases_where(lambda c: c.has_torch), ids=ids(cases_where(lambda c: c.has_torch)))
@modes
def test_empty_batch_parameter_gradients_are_zero(case: LayerCase, training):
    shape = (0,) + case.shapes[0][1:]
    layer = build(case, case.shapes[0]).train(training)
    x = torch.randn(shape, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    for name in PARAMS:
        param = getattr(layer, name, None)
        if param is not None:
            assert param.grad is not None, f"{name}.grad is None (torch: zeros)"
            assert torch.equal(param.grad, torch.zeros_like(param))


# --------------------------------------------------------------------------------------------
# 9. channels_last
# --------------------------------------------------------------------------------------------


@over(cases_where(lambda c: c.supports_channels_last))
@modes
def test_channels_last_equals_contiguous(case: LayerCase, training):
    for shape in case.channels_last_shapes:
        fmt = channels_last_format(len(shape))
        contiguous = build(case, shape).train(training)
        last = copy.deepcopy(contiguous)
        x = sample_input(shape, seed_of("cl", case.name, shape))
        dy = sample_input(shape, seed_of("cl-dy", case.name, shape))
        y_c, g_c = run_with_grads(contiguous, x, dy)
        y_l, g_l = run_with_grads(last, x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt))
        assert torch.isfinite(y_l).all()
        assert_close(y_l, y_c, LAYOUT_TOL, f"output for {shape}")
        for name in g_c:
            tol = grad_tol(LAYOUT_TOL, contiguous, x, name)
            assert_close(g_l[name], g_c[name], tol, f"d{name} for {shape}")
        for name, value in running_state(contiguous).items():
            assert_close(getattr(last, name), value, LAYOUT_TOL, f"{name} for {shape}")

        theirs = case.make_torch(shape)
        if theirs is not None:  # keep torch's output memory format
            theirs.load_state_dict(contiguous.state_dict())
            y_t = theirs.train(training)(x.contiguous(memory_format=fmt))
            assert y_l.is_contiguous(memory_format=fmt) == y_t.is_contiguous(memory_format=fmt)


# --------------------------------------------------------------------------------------------
# 10. Property-based: random shapes, momentum and eps against the reference
# --------------------------------------------------------------------------------------------


@st.composite
def layer_inputs(draw, case: LayerCase):
    """A valid random input shape and constructor options for ``case``."""
    ndim = draw(st.sampled_from(sorted({len(s) for s in case.shapes})))
    channels = draw(st.integers(1, 6).filter(case.channels_ok))
    shape = (draw(st.integers(2, 6)), channels) + tuple(
        draw(st.integers(1, 5)) for _ in range(ndim - 2)
    )
    assume(case.shape_ok(shape))
    options = {}
    if "eps" in case.tunable:
        options["eps"] = draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.1]))
    if "momentum" in case.tunable:
        options["momentum"] = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**31 - 1))
    return shape, options, seed


@over(CASES)
@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(data=st.data())
def test_property_forward_and_stats_match_reference(case: LayerCase, data):
    shape, options, seed = data.draw(layer_inputs(case))
    layer = randomize_(case.make(shape, dtype=torch.float64, **options), seed)
    state = snapshot(layer, torch.float64)
    for step, training in enumerate([True, True, False]):
        layer.train(training)
        x = sample_input(shape, seed + step, torch.float64)
        expected = case.forward(state, to_numpy(x), training)
        y = layer(x)
        assert_close(y, expected.y, 1e-8, f"output at step {step + 1}, input {shape}, {options}")
        if case.has_running_stats:
            assert_stats_match_reference(layer, expected, 1e-12, f"step {step + 1}")
        state = state.after(expected)


# --------------------------------------------------------------------------------------------
# 11. Errors that teach
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: normlab.BatchNorm1d(3), (2, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\)"),
        (lambda: normlab.BatchNorm2d(3), (2, 3, 4), r"expected 4D input \(got 3D input\)"),
        (lambda: normlab.BatchNorm3d(3), (2, 3, 4, 4), r"expected 5D input \(got 4D input\)"),
        (lambda: normlab.InstanceNorm1d(3), (2, 3, 4, 4), r"expected 2D or 3D input \(got 4D input\)"),
        (lambda: normlab.InstanceNorm2d(3), (3, 4), r"expected 3D or 4D input \(got 2D input\)"),
        (lambda: normlab.InstanceNorm3d(3), (3, 4, 4, 4, 4, 4), r"expected 4D or 5D input \(got 6D input\)"),
        (lambda: normlab.GroupNorm(1, 3), (3,), r"GroupNorm\(3\): expected input \(N, 3, \*\), got shape \(3,\)"),
        (lambda: normlab.LayerNorm((3, 4)), (4,), r"normalized_shape=\[3, 4\], got input of shape \(4,\)"),
        (lambda: normlab.RMSNorm((3, 4)), (4,), r"normalized_shape=\[3, 4\], got input of shape \(4,\)"),
    ],
    ids=["bn1d", "bn2d", "bn3d", "in1d", "in2d", "in3d", "group", "layer", "rms"],
)
def test_error_wrong_input_rank(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make()(torch.randn(shape))


@pytest.mark.parametrize(
    "make, shape, match",
    [
        (lambda: normlab.BatchNorm1d(3), (4, 5),
         r"BatchNorm1d\(3\): expected 3 channels in dimension 1, got input of shape \(4, 5\)"),
        (lambda: normlab.BatchNorm2d(3), (2, 4, 5, 5),
         r"BatchNorm2d\(3\): expected 3 channels in dimension 1, got input of shape \(2, 4, 5, 5\)"),
        (lambda: normlab.BatchNorm3d(3, affine=False, track_running_stats=False), (2, 4, 2, 2, 2),
         r"BatchNorm3d\(3\): expected 3 channels"),
        (lambda: normlab.InstanceNorm2d(3, affine=True), (2, 4, 5, 5),
         r"InstanceNorm2d\(3\): expected 3 channels in dimension 1, got input of shape \(2, 4, 5, 5\)"),
        (lambda: normlab.InstanceNorm1d(3, track_running_stats=True), (2, 4, 5),
         r"InstanceNorm1d\(3\): expected 3 channels in dimension 1, got input of shape \(2, 4, 5\)"),
        (lambda: normlab.GroupNorm(2, 4), (2, 6, 3), r"GroupNorm\(4\): expected input \(N, 4, \*\), got shape \(2, 6, 3\)"),
        (lambda: normlab.LayerNorm(4), (2, 5), r"trailing dimensions must equal normalized_shape=\[4\]"),
        (lambda: normlab.RMSNorm(4), (2, 5), r"trailing dimensions must equal normalized_shape=\[4\]"),
    ],
    ids=["bn1d", "bn2d", "bn3d-no-affine", "in2d-affine", "in1d-tracking", "group", "layer", "rms"],
)
def test_error_wrong_channel_count(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make()(torch.randn(shape))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: normlab.BatchNorm2d(0), ValueError, r"BatchNorm2d: num_features must be a positive int, got 0"),
        (lambda: normlab.BatchNorm1d(2.5), TypeError, r"num_features must be a positive int, got float 2.5"),
        (lambda: normlab.InstanceNorm1d(0), ValueError, r"InstanceNorm1d: num_features must be a positive int"),
        (lambda: normlab.GroupNorm(1, 0), ValueError, r"GroupNorm: num_channels must be a positive int"),
        (lambda: normlab.BatchNorm2d(3, eps=-1e-5), ValueError, r"BatchNorm2d: eps must be a finite number > 0"),
        (lambda: normlab.InstanceNorm2d(3, eps=-1.0), ValueError, r"eps must be a finite number > 0"),
        (lambda: normlab.GroupNorm(1, 3, eps=-1.0), ValueError, r"eps must be a finite number > 0"),
        (lambda: normlab.LayerNorm(3, eps=-1.0), ValueError, r"LayerNorm: eps must be a finite number > 0"),
        (lambda: normlab.RMSNorm(3, eps=-1.0), ValueError, r"RMSNorm: eps must be a finite number > 0"),
        (lambda: normlab.BatchNorm2d(3, momentum=1.5), ValueError,
         r"momentum must lie in \[0, 1\].*got 1.5.*momentum_from_decay"),
        (lambda: normlab.InstanceNorm2d(3, momentum=1.5), ValueError, r"momentum must lie in \[0, 1\]"),
        (lambda: normlab.BatchNorm2d(3, momentum="x"), TypeError,
         r"momentum must be a float in \[0, 1\] or None.*got str 'x'"),
        (lambda: normlab.GroupNorm(4, 6), ValueError,
         r"num_channels=6 must be divisible by num_groups=4; valid num_groups are \[1, 2, 3, 6\]"),
        (lambda: normlab.GroupNorm(0, 6), ValueError, r"num_groups must be a positive int, got 0"),
        (lambda: normlab.BatchNorm2d(3, single_sample="bogus"), ValueError,
         r"single_sample must be one of \['error', 'running'\], got 'bogus'"),
        (lambda: normlab.BatchNorm2d(3, on_nonfinite="bogus"), ValueError,
         r"on_nonfinite must be one of \['warn', 'skip', 'raise'\], got 'bogus'"),
        (lambda: normlab.InstanceNorm2d(3, on_nonfinite="bogus"), ValueError,
         r"on_nonfinite must be one of \['warn', 'skip', 'raise'\], got 'bogus'"),
    ],
    ids=["bn-zero", "bn-float", "in-zero", "gn-zero", "bn-eps", "in-eps", "gn-eps", "ln-eps",
         "rms-eps", "bn-momentum", "in-momentum", "bn-momentum-str", "gn-groups", "gn-zero-groups",
         "single-sample", "on-nonfinite-bn", "on-nonfinite-in"],
)
def test_error_bad_constructor_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_error_get_norm_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"get_norm: unknown norm 'batchnorm'") as info:
        normlab.get_norm("batchnorm", 8)
    names = normlab.norm_names()
    assert {"batch2d", "group", "layer", "rms", "none"} <= set(names)
    for name in names:
        assert repr(name) in str(info.value), f"{name!r} missing from {info.value}"


@pytest.mark.parametrize(
    "cls, shape",
    [(normlab.BatchNorm1d, (1, 4)), (normlab.BatchNorm1d, (1, 4, 1)), (normlab.BatchNorm2d, (1, 4, 1, 1)),
     (normlab.BatchNorm3d, (1, 4, 1, 1, 1))],
    ids=["bn1d-NC", "bn1d-NCL", "bn2d", "bn3d"],
)
def test_error_single_value_per_channel_in_training(cls, shape):
    model = nn.Sequential(nn.Identity(), cls(4))
    normlab.name_layers(model)
    pattern = (
        rf"{cls.__name__}\(4\) '1': training needs more than one value per channel.*"
        rf"{re.escape(str(shape))}.*drop_last.*single_sample='running'"
    )
    with pytest.raises(ValueError, match=pattern):
        model(torch.randn(shape))
    assert int(model[1].num_batches_tracked) == 0
    model.eval()(torch.randn(shape))  # in eval the running statistics serve: no error


def test_every_registered_norm_has_a_case():
    """A new layer in the registry must join the harness (cases.py)."""
    covered = {type(c.make(c.shapes[0])).__name__ for c in CASES}
    for name in normlab.norm_names():
        kw = {"dim": 2} if name in ("batch", "instance") else {}
        layer = normlab.get_norm(name, 4, **kw)
        if isinstance(layer, nn.Identity):
            continue
        assert type(layer).__name__ in covered, f"get_norm({name!r}) builds an untested layer"


def test_case_shapes_are_valid():
    """Catch registry mistakes: every shape builds and passes the case's own validity rules."""
    names = [c.name for c in CASES]
    assert len(names) == len(set(names)), "duplicate case names"
    for case in CASES:
        for shape in case.shapes + (case.gradcheck_shape,):
            assert case.shape_ok(shape) and case.channels_ok(shape[1]), (case.name, shape)
        assert math.prod(case.gradcheck_shape) <= 64, f"{case.name}: gradcheck input too large"
