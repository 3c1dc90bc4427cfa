"""Build normlab's compiled kernel once, before any test runs.

The first channel-innermost batch norm would otherwise build it (about a minute) inside
whichever test comes first, possibly one with a time limit, or in several worker processes at
once (the distributed tests)."""

import pytest

from kernel_paths import can_build

from normlab import kernels


@pytest.fixture(autouse=True, scope="session")
def _compiled_kernel_built():
    if can_build:
        kernels.channels_last()
    yield
