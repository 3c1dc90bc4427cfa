"""normlab's compiled kernels for channel-innermost batch norm (normlab.kernels) against the
float64 reference, and against the torch-op path that serves where they cannot be built."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import normlab
from normlab import functional as NF
from normlab import kernels
from normlab.functional import _dispatch, _numerics
from normlab import reference as ref

from device_switch import cpu_only
from kernel_paths import can_build, kernel_path as path  # noqa: F401 - a fixture

needs_kernels = pytest.mark.skipif(not can_build, reason="no C++ compiler here, or NORMLAB_NO_EXTENSION set")
pytestmark = cpu_only  # normlab's compiled kernels are CPU kernels

# (shape, memory format) of channel-innermost inputs with enough rows for the accurate path
_LAYOUTS = {
    "2d": ((1024, 24), None),
    "channels_last": ((16, 12, 12, 10), torch.channels_last),
    "channels_last_3d": ((4, 8, 6, 8, 10), torch.channels_last_3d),
    "3d-transposed": ((32, 20, 40), "transposed"),  # (N, C, L) whose channel stride is 1
}


def _input(layout: str, offset: float, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    shape, fmt = _LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + offset
    if fmt == "transposed":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x = x.to(dtype)
    assert _numerics.channel_innermost(x)
    return x


def _moments64(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    values = x.double().movedim(1, -1).reshape(-1, x.shape[1]).numpy()
    return values.mean(0), values.var(0)


@needs_kernels
def test_extension_builds_and_loads():
    module = kernels.channels_last()
    assert module is not None
    assert kernels.channels_last() is module  # built once per process


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_channel_mean_var_matches_float64(path, layout, offset):
    x = _input(layout, offset)
    mean, var = NF.channel_mean_var(x)
    true_mean, true_var = _moments64(x)
    assert mean.dtype == var.dtype == torch.float32
    # float32 rounding of the result (mean) and a few ulps of the variance
    np.testing.assert_allclose(mean.double().numpy(), true_mean, rtol=2**-22, atol=1e-6)
    np.testing.assert_allclose(var.double().numpy(), true_var, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_channel_mean_var_dtypes(path, dtype):
    x = _input("channels_last", 50.0, dtype=dtype)
    mean, var = NF.channel_mean_var(x)
    assert mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    true_mean, true_var = _moments64(x)  # of the values the input holds
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(mean.double().numpy(), true_mean, rtol=rtol)
    np.testing.assert_allclose(var.double().numpy(), true_var, rtol=rtol)


@pytest.mark.parametrize("value", [0.0, 0.1, 7.3, -1e5])
def test_constant_channel_gets_its_value_and_zero_variance(path, value):
    # 0.1 and 7.3: a sample mean of copies of the value need not round back to it, which the
    # compiled path detects (the shift is off by more than the channel's spread) and corrects.
    x = _input("2d", 3.0)
    x[:, 5] = value
    mean, var = NF.channel_mean_var(x)
    assert float(mean[5]) == float(torch.tensor(value, dtype=torch.float32))
    assert float(var[5]) == 0.0


def test_shift_far_from_the_mean_still_accurate(path):
    # The sampled rows (every n/64-th) sit 1e3 standard deviations away from the others: the
    # first shift is far off, and the second pass must restore the accuracy.
    x = _input("2d", 0.0).clone() * 1e-3 + 10.0
    step = x.shape[0] // _dispatch.SHIFT_SAMPLE_ROWS
    x[::step] += 1.0
    mean, var = NF.channel_mean_var(x)
    true_mean, true_var = _moments64(x)
    np.testing.assert_allclose(mean.double().numpy(), true_mean, rtol=2**-22)
    np.testing.assert_allclose(var.double().numpy(), true_var, rtol=1e-5)


@pytest.mark.parametrize("layout", list(_LAYOUTS))
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_forward_and_backward_match_reference(path, layout, affine):
    x = _input(layout, 20.0).requires_grad_()
    g = torch.Generator().manual_seed(1)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64).to(torch.float32)
    bn = (normlab.BatchNorm1d if x.dim() <= 3 else normlab.BatchNorm2d if x.dim() == 4 else normlab.BatchNorm3d)(
        x.shape[1], affine=affine, momentum=1.0)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.normal_(generator=g)
    y = bn(x)
    y.backward(dy)
    w = bn.weight.detach().double().numpy() if affine else None
    b = bn.bias.detach().double().numpy() if affine else None
    xn = x.detach().double().numpy()
    want_y, want_mean, want_var, _ = ref.batch_norm(xn, np.zeros(x.shape[1]), np.ones(x.shape[1]), w, b,
                                                    training=True, momentum=1.0)
    want_dx, want_dw, want_db = ref.batch_norm_backward(dy.double().numpy(), xn, w)
    np.testing.assert_allclose(y.detach().double().numpy(), want_y, atol=2e-6)
    np.testing.assert_allclose(bn.running_mean.double().numpy(), want_mean, rtol=2**-22)
    np.testing.assert_allclose(bn.running_var.double().numpy(), want_var, rtol=1e-5)
    scale = np.abs(want_dx).max()
    np.testing.assert_allclose(x.grad.double().numpy(), want_dx, atol=2e-6 * scale)
    assert x.grad.stride() == x.stride()  # the gradient keeps the input's layout
    if affine:
        np.testing.assert_allclose(bn.weight.grad.double().numpy(), want_dw, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(bn.bias.grad.double().numpy(), want_db, rtol=1e-5, atol=1e-5)


class _CountingKernels:
    """The compiled module, counting the calls that reach it (which path served is then known)."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def __getattr__(self, name):
        function = getattr(self.module, name)

        def call(*args, **kwargs):
            self.calls.append(name)
            return function(*args, **kwargs)

        return call


def _counting_kernels(monkeypatch) -> _CountingKernels:
    module = kernels.channels_last()
    assert module is not None, "the compiled kernels did not build: this test would compare the fallback with itself"
    spy = _CountingKernels(module)
    monkeypatch.setitem(kernels._state, "module", spy)
    return spy


@needs_kernels
def test_item_9_compiled_and_torch_op_paths_agree(monkeypatch):
    """Issue 15 item 9: this test compared the fallback with itself when the kernels were not
    built or not used; the compiled calls are now counted in the first run and absent in the second."""
    x = _input("channels_last", 3.0).requires_grad_()
    dy = torch.randn_like(x)

    def run():
        bn = normlab.BatchNorm2d(x.shape[1])
        x.grad = None
        y = bn(x)
        y.backward(dy)
        return y.detach(), x.grad.clone(), bn.weight.grad, bn.running_var.clone()

    spy = _counting_kernels(monkeypatch)
    compiled = run()
    assert {"mean_var", "backward"} <= set(spy.calls), spy.calls  # the statistics and the gradient sums
    monkeypatch.setitem(kernels._state, "module", None)
    fallback = run()
    for a, b in zip(compiled, fallback):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 * float(b.abs().max()))


@needs_kernels
def test_thread_count_does_not_change_the_statistics(monkeypatch):
    x = _input("2d", 100.0)
    spy = _counting_kernels(monkeypatch)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = NF.channel_mean_var(x)
    finally:
        torch.set_num_threads(threads)
    many = NF.channel_mean_var(x)
    assert spy.calls.count("mean_var") == 2  # the compiled kernel at both thread counts
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("NORMLAB_NO_EXTENSION", "1")
    monkeypatch.setattr(kernels, "_state", {})
    assert kernels.disabled()
    assert kernels.channels_last() is None


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def broken(**_):
        raise RuntimeError("Error building extension 'x': c++: not found")

    monkeypatch.delenv("NORMLAB_NO_EXTENSION", raising=False)
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cpp_extension, "load", broken)
    with pytest.warns(RuntimeWarning, match=r"could not build .*c\+\+: not found.*NORMLAB_NO_EXTENSION=1"):
        assert kernels.channels_last() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.channels_last() is None  # no second attempt, no second warning
    x = _input("channels_last", 5.0)
    mean, var = NF.channel_mean_var(x)  # the torch-op path serves
    np.testing.assert_allclose(var.double().numpy(), _moments64(x)[1], rtol=1e-5)


def test_a_build_lock_left_by_a_killed_build_is_removed(tmp_path, monkeypatch, caplog):
    """torch waits forever for the lock of a build that was killed: normlab removes a stale one
    (and only a stale one: a live build's lock is younger)."""
    import os
    import time

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from torch.utils.cpp_extension import _get_build_directory

    lock = os.path.join(_get_build_directory("normlab_probe", verbose=False), "lock")
    open(lock, "w").close()
    assert not kernels._clear_stale_lock("normlab_probe") and os.path.exists(lock)  # a live build's
    old = time.time() - kernels.STALE_LOCK_SECONDS - 60
    os.utime(lock, (old, old))
    with caplog.at_level("WARNING", logger="normlab.kernels"):
        assert kernels._clear_stale_lock("normlab_probe")
    assert not os.path.exists(lock)
    assert "removed the compiled kernel's build lock" in caplog.text and "interrupted build" in caplog.text
    assert not kernels._clear_stale_lock("normlab_probe")  # no lock: nothing to do
