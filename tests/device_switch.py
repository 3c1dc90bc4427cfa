"""NORMLAB_TEST_DEVICE: the device the conformance harness runs its layers and inputs on.

``NORMLAB_TEST_DEVICE=cuda python -m pytest -q tests/conformance`` runs every conformance and
edge-case test on the GPU (``cuda:1`` picks another); unset or ``cpu``, the tests run on the
CPU exactly as before. Tests of the compiled CPU kernels skip on another device. A value that
names no device, or a GPU that torch cannot see, stops the run with an error instead of
quietly testing the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import pytest
import torch

VARIABLE = "NORMLAB_TEST_DEVICE"


def device_from_env(environ: Mapping[str, str] = os.environ) -> torch.device:
    """The test device named by ``NORMLAB_TEST_DEVICE`` (default cpu).

    Raises:
        ValueError: not ``cpu``, ``cuda`` or ``cuda:N``, or a GPU that torch does not see.
    """
    name = environ.get(VARIABLE, "").strip().lower() or "cpu"
    if name != "cpu" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise ValueError(f"{VARIABLE}={environ[VARIABLE]!r} is not a test device; use cpu (the default), cuda or "
                         f"cuda:N.")
    if name == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = torch.device(name)
    if (device.index or 0) >= count:
        seen = f"sees {count} CUDA device(s)" if count else "sees no CUDA GPU (a CPU build, or no driver)"
        raise ValueError(f"{VARIABLE}={name} asks for a GPU, but torch {torch.__version__} {seen}; unset it to test "
                         f"on the CPU.")
    return device


try:
    TEST_DEVICE, PROBLEM = device_from_env(), None
except ValueError as err:  # conftest's pytest_configure stops the run with it
    TEST_DEVICE, PROBLEM = torch.device("cpu"), str(err)


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the device tensors are made on (the test device inside the harness;
    the CPU, and the same numbers as ``torch.Generator()``, by default)."""
    return torch.Generator(device=torch.get_default_device()).manual_seed(seed)


cpu_only = pytest.mark.skipif(TEST_DEVICE.type != "cpu",
                              reason=f"tests normlab's CPU kernels or CPU numbers: {VARIABLE}={TEST_DEVICE}")


@contextmanager
def default_device(device: torch.device) -> Iterator[None]:
    """Tensors and modules made inside are made on ``device`` (nothing changes for the CPU)."""
    if device.type == "cpu":
        yield
        return
    previous = torch.get_default_device()
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(previous)
