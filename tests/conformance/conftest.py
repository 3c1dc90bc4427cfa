"""Run the conformance tests on one intra-op thread, and on ``NORMLAB_TEST_DEVICE`` (default cpu):
its layers, inputs and every tensor the tests make are made there (``tests/device_switch.py``).

The checks use many tiny tensors; on a shared 2-core machine torch's OpenMP threads then spend
most of their time waiting for each other (a 0.2 ms forward took 40 ms under load), and the
suite went from ~20 s to minutes. One thread also fixes the reduction order, so the float32
tolerances are exercised deterministically. The previous setting is restored afterwards.
"""

import pytest
import torch

from device_switch import TEST_DEVICE, default_device


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _on_test_device():
    with default_device(TEST_DEVICE):
        yield
