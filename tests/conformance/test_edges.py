"""Regression tests, one per point where normlab is meant to do better than torch.nn.

Each test is named after the problem it pins and, where torch shows the problem, shows it too.
Oracles: the float64 reference, torch.nn, and values known analytically.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import numpy as np
import pytest
import torch
from device_switch import generator
from kernel_paths import kernel_path  # noqa: F401 - a fixture
from torch import nn

import normlab
from normlab import reference as ref

from .cases import randomize_, to_numpy


def _randomized(layer: nn.Module, seed: int = 0) -> nn.Module:
    return randomize_(layer, seed)


def _frozen(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {
        k: getattr(layer, k).clone()
        for k in ("running_mean", "running_var", "num_batches_tracked", "num_batches_skipped")
    }


def _assert_unchanged(layer: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, value in before.items():
        assert torch.equal(getattr(layer, name), value), f"{name} changed"


# --------------------------------------------------------------------------------------------
# single_sample="running"
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, shape",
    [(normlab.BatchNorm1d, (1, 5)), (normlab.BatchNorm2d, (1, 5, 1, 1))],
    ids=["bn1d", "bn2d"],
)
def test_single_sample_running_fallback_leaves_stats(cls, shape):
    layer = _randomized(cls(5, single_sample="running")).train()
    x = torch.randn(shape)
    before = _frozen(layer)
    expected, *_ = ref.batch_norm(
        to_numpy(x), to_numpy(layer.running_mean), to_numpy(layer.running_var),
        to_numpy(layer.weight), to_numpy(layer.bias), training=False, eps=layer.eps,
    )
    y = layer(x)
    assert layer.training
    np.testing.assert_allclose(to_numpy(y), expected, rtol=1e-6, atol=1e-6)
    _assert_unchanged(layer, before)
    assert torch.equal(y, layer.eval()(x)), "differs from the eval-mode output"

    # A batch of two trains as usual afterwards.
    layer.train()(torch.randn((2,) + shape[1:]))
    assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1


# --------------------------------------------------------------------------------------------
# Non-finite batches
# --------------------------------------------------------------------------------------------


def _model(on_nonfinite: str) -> nn.Sequential:
    model = nn.Sequential(OrderedDict(
        stem=nn.Identity(), block=nn.Sequential(normlab.BatchNorm2d(3, on_nonfinite=on_nonfinite))
    ))
    _randomized(model.block[0])
    return normlab.name_layers(model)


def _nan_batch() -> torch.Tensor:
    x = torch.randn(4, 3, 5, 5)
    x[1, 0, 2, 2] = float("nan")
    return x


def test_nonfinite_batch_does_not_poison_running_stats():
    model = _model("warn").train()
    bn = model.block[0]
    before = _frozen(bn)
    with pytest.warns(normlab.NonFiniteStatisticsWarning, match=r"BatchNorm2d\(3\) 'block.0'.*non-finite"):
        model(_nan_batch())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), before[name]), f"{name} changed on a NaN batch"
    assert int(bn.num_batches_skipped) == 1

    # The next finite batch updates normally, from the kept statistics.
    x = torch.randn(4, 3, 5, 5)
    _, rm, rv, count = ref.batch_norm(
        to_numpy(x), to_numpy(before["running_mean"]), to_numpy(before["running_var"]),
        to_numpy(bn.weight), to_numpy(bn.bias), training=True, momentum=bn.momentum, eps=bn.eps,
        num_batches_tracked=int(before["num_batches_tracked"]),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning for a finite batch
        model(x)
    np.testing.assert_allclose(to_numpy(bn.running_mean), rm, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(to_numpy(bn.running_var), rv, rtol=1e-6, atol=1e-6)
    assert int(bn.num_batches_tracked) == count
    assert int(bn.num_batches_skipped) == 1


def test_nonfinite_batch_raise_policy_leaves_stats():
    model = _model("raise").train()
    bn = model.block[0]
    before = _frozen(bn)
    with pytest.raises(FloatingPointError, match=r"BatchNorm2d\(3\) 'block.0': the batch statistics are not finite"):
        model(_nan_batch())
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), before[name]), f"{name} changed"


def test_nonfinite_batch_skip_policy_is_silent():
    model = _model("skip").train()
    bn = model.block[0]
    before = _frozen(bn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(_nan_batch())
        model.eval()  # the deferred report on leaving training must stay silent too
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(bn, name), before[name]), f"{name} changed"
    assert int(bn.num_batches_skipped) == 1


def test_nonfinite_batch_poisons_torch_running_stats():
    """The contrast: torch.nn.BatchNorm2d takes the NaN into its running statistics for good."""
    bn = nn.BatchNorm2d(3).train()
    bn(_nan_batch())
    assert torch.isnan(bn.running_mean[0]) and torch.isnan(bn.running_var[0])
    bn(torch.randn(4, 3, 5, 5))
    assert torch.isnan(bn.running_mean[0]), "a later finite batch cannot repair it"


# --------------------------------------------------------------------------------------------
# 16-bit modules keep float32 statistics
# --------------------------------------------------------------------------------------------


def _train_at_mean_100(layer: nn.Module, shape, steps: int, dtype) -> np.ndarray:
    """Train on data with mean 100; return the float64 reference's running mean for that data."""
    g = generator(0)
    rm, rv = to_numpy(layer.running_mean), to_numpy(layer.running_var)
    reduce = (0,) + tuple(range(2, len(shape)))
    for _ in range(steps):
        x = (torch.randn(shape, generator=g) + 100).to(dtype)
        layer(x)
        values = to_numpy(x)
        if isinstance(layer, nn.modules.instancenorm._InstanceNorm):  # mean of per-instance stats
            spatial = tuple(range(2, len(shape)))
            n = int(np.prod(shape[2:]))
            mean = values.mean(spatial).mean(0)
            var = (values.var(spatial) * n / (n - 1)).mean(0)
            rm, rv = (1 - layer.momentum) * rm + layer.momentum * mean, (1 - layer.momentum) * rv + layer.momentum * var
        else:
            n = values.size // shape[1]
            rm, rv = ref.update_running_stats(
                rm, rv, values.mean(reduce), values.var(reduce), n, momentum=layer.momentum
            )
    return rm




@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: normlab.BatchNorm1d(8, momentum=0.02), (64, 8)),
        (lambda: normlab.BatchNorm2d(4, momentum=0.02), (8, 4, 4, 4)),
        (lambda: normlab.InstanceNorm1d(4, momentum=0.02, affine=True, track_running_stats=True), (8, 4, 16)),
        pytest.param(lambda: normlab.InstanceNorm1d(4, momentum=0.02, track_running_stats=True), (8, 4, 16)),
    ],
    ids=["bn1d", "bn2d", "in1d-affine", "in1d-no-affine"],
)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_half_precision_statistics_in_float32(make, shape, dtype):
    layer = make().to(dtype).train()
    assert layer.running_mean.dtype == torch.float32 and layer.running_var.dtype == torch.float32
    expected = _train_at_mean_100(layer, shape, steps=500, dtype=dtype)
    assert layer.running_mean.dtype == torch.float32
    # float32 EMA: rounding ~4e-6 per step, damped by momentum; a float16 EMA stalls ~1.5 short
    # (it stops once momentum * (100 - mean) < half an ulp of 100, 0.03125), bfloat16 ~12 short.
    np.testing.assert_allclose(to_numpy(layer.running_mean), expected, atol=1e-3, rtol=0)
    assert np.abs(to_numpy(layer.running_mean) - 100).max() < 0.1


def test_half_precision_statistics_stall_in_torch():
    """The contrast: torch.nn.BatchNorm1d(...).half() keeps a float16 EMA that stops short of 100."""
    layer = nn.BatchNorm1d(8, momentum=0.02).half().train()
    _train_at_mean_100(layer, (64, 8), steps=500, dtype=torch.float16)
    assert layer.running_mean.dtype == torch.float16
    assert (100 - layer.running_mean.float()).min() > 1.0


# --------------------------------------------------------------------------------------------
# Accuracy at large offsets and in channels_last
# --------------------------------------------------------------------------------------------

_OFFSET_LAYOUTS = {
    "bn1d": ((4096, 64), None),
    "bn2d-nchw": ((16, 8, 32, 32), torch.contiguous_format),
    "bn2d-channels_last": ((16, 8, 32, 32), torch.channels_last),
}


def _offset_input(layout: str, shift: float) -> torch.Tensor:
    shape, fmt = _OFFSET_LAYOUTS[layout]
    g = generator(int(shift))
    x = torch.randn(shape, generator=g) + shift
    return x if fmt is None else x.contiguous(memory_format=fmt)


def _bn_for(x: torch.Tensor) -> nn.Module:
    return (normlab.BatchNorm1d if x.dim() == 2 else normlab.BatchNorm2d)(x.shape[1]).train()


@pytest.mark.parametrize("layout", list(_OFFSET_LAYOUTS))
@pytest.mark.parametrize("shift", [1e4, 1e5, 1e6])
def test_stable_statistics_large_offset(layout, shift, kernel_path):
    # The reference normalizes the float32 values the input holds; every layout gets their
    # normalized values to a few float32 ulps, however large the offset (torch's channels_last
    # and 2-D kernels lose ~ eps * offset / std).
    x = _offset_input(layout, shift)
    expected, *_ = ref.batch_norm(to_numpy(x), training=True)
    y = _bn_for(x)(x)
    err = np.abs(to_numpy(y) - expected).max()
    bound = 16 * 2**-23
    print(f"{layout} shift {shift:g} ({kernel_path}): max abs error {err:.3g} (bound {bound:.3g})")
    assert err <= bound


@pytest.mark.parametrize("layout", list(_OFFSET_LAYOUTS))
@pytest.mark.parametrize("shift", [1e4, 1e5, 1e6])
def test_constant_channel_at_large_offset_is_finite(layout, shift):
    x = _offset_input(layout, shift)
    x[:, 0] = shift
    y = _bn_for(x)(x)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("layout", list(_OFFSET_LAYOUTS))
@pytest.mark.parametrize("shift", [1e4, 1e5, 1e6])
def test_constant_channel_at_large_offset_gives_exactly_beta(layout, shift):
    x = _offset_input(layout, shift)
    x[:, 0] = shift
    bn = _bn_for(x)
    with torch.no_grad():
        bn.weight.fill_(1.5)
        bn.bias.fill_(0.25)
    y = bn(x)
    assert torch.isfinite(y).all()
    assert torch.equal(torch.unique(y[:, 0].detach()), torch.tensor([0.25])), torch.unique(y[:, 0])


def test_channels_last_accuracy_vs_reference(kernel_path):
    g = generator(7)
    x = torch.randn(16, 16, 28, 28, generator=g) * 2 + 3
    expected, *_ = ref.batch_norm(to_numpy(x), training=True)

    def error(lib, memory_format) -> float:
        y = lib.BatchNorm2d(16).train()(x.contiguous(memory_format=memory_format))
        return float(np.abs(to_numpy(y) - expected).max())

    nchw = error(normlab, torch.contiguous_format)
    last = error(normlab, torch.channels_last)
    theirs = error(nn, torch.channels_last)
    print(f"max abs error vs float64: normlab NCHW {nchw:.3g}, normlab channels_last {last:.3g}, "
          f"torch channels_last {theirs:.3g}")
    assert last <= 3 * nchw
    assert last < 2e-6


def test_channels_last_parameter_gradients_as_accurate_as_nchw(kernel_path):
    g = generator(7)
    x = torch.randn(16, 16, 28, 28, generator=g) * 2 + 3
    dy = torch.randn(16, 16, 28, 28, generator=g)
    _, dw, db = ref.batch_norm_backward(to_numpy(dy), to_numpy(x))

    def errors(memory_format) -> tuple[float, float]:
        bn = normlab.BatchNorm2d(16).train()
        bn(x.contiguous(memory_format=memory_format)).backward(dy.contiguous(memory_format=memory_format))
        return (float(np.abs(to_numpy(bn.weight.grad) - dw).max()),
                float(np.abs(to_numpy(bn.bias.grad) - db).max()))

    (w_nchw, b_nchw), (w_last, b_last) = errors(torch.contiguous_format), errors(torch.channels_last)
    print(f"dweight error NCHW {w_nchw:.3g} channels_last {w_last:.3g}; "
          f"dbias error NCHW {b_nchw:.3g} channels_last {b_last:.3g}")
    assert w_last <= 3 * w_nchw and b_last <= 3 * b_nchw


def test_item_9_layers_and_inputs_are_made_on_the_test_device():
    """Issue 15 item 9: with NORMLAB_TEST_DEVICE=cuda the harness runs on the GPU (here: the CPU)."""
    from device_switch import TEST_DEVICE

    from .cases import CASES, sample_input

    case = CASES[0]
    shape = case.shapes[0]
    layer = case.make(shape)
    assert {p.device.type for p in layer.parameters()} <= {TEST_DEVICE.type}
    assert sample_input((4, 3), seed=0).device.type == TEST_DEVICE.type
    assert torch.zeros(1).device.type == TEST_DEVICE.type
