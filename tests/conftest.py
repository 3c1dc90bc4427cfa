"""Build normlab's compiled kernel once, before any test runs.

The first channel-innermost batch norm would otherwise build it (about a minute) inside
whichever test comes first, possibly one with a time limit, or in several worker processes at
once (the distributed tests)."""

import pytest

import device_switch
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
