"""Build normlab's compiled kernel once, before any test runs; run the tests of the device folders
(``tests/conformance``, ``tests/layers``) on ``NORMLAB_TEST_DEVICE`` (``tests/device_switch.py``).

The first channel-innermost batch norm would otherwise build it (about a minute) inside
whichever test comes first, possibly one with a time limit, or in several worker processes at
once (the distributed tests)."""

import device_switch
import pytest
from device_switch import DEVICE_FOLDERS, TEST_DEVICE, default_device
from kernel_paths import can_build

from normlab import kernels


def pytest_configure(config):
    if device_switch.PROBLEM:  # never test the CPU quietly when a GPU was asked for
        raise pytest.UsageError(device_switch.PROBLEM)


@pytest.fixture(autouse=True, scope="session")
def _compiled_kernel_built():
    if can_build:
        kernels.channels_last()
    yield


@pytest.fixture(autouse=True)
def _on_test_device(request):
    """Tensors and modules a device-folder test makes are made on the test device."""
    tests = request.config.rootpath / "tests"
    path = request.node.path
    if path.is_relative_to(tests) and path.relative_to(tests).parts[0] in DEVICE_FOLDERS:
        with default_device(TEST_DEVICE):
            yield
    else:
        yield
