"""A fixture that runs a test twice: with normlab's compiled kernels (normlab.kernels) and with
the torch-op path that serves where they cannot be built."""

from __future__ import annotations

import shutil
import sys

import pytest

from device_switch import TEST_DEVICE
from normlab import kernels

can_build = sys.platform.startswith("linux") and shutil.which("c++") is not None and not kernels.disabled()


@pytest.fixture(params=["compiled", "torch-ops"])
def kernel_path(request, monkeypatch) -> str:
    if TEST_DEVICE.type != "cpu":
        pytest.skip(f"both paths are CPU paths; the tests run on {TEST_DEVICE} (NORMLAB_TEST_DEVICE)")
    if request.param == "compiled":
        if not can_build:
            pytest.skip("no C++ compiler here, or NORMLAB_NO_EXTENSION set")
        assert kernels.channels_last() is not None
    else:
        monkeypatch.setitem(kernels._state, "module", None)
    return request.param
