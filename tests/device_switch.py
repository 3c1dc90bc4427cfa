"""NORMLAB_TEST_DEVICE: the device the layer tests run their layers and inputs on.

``NORMLAB_TEST_DEVICE=cuda python -m pytest -q tests/conformance tests/layers`` runs the
conformance harness, the edge cases and every layer test on the GPU (``cuda:1`` picks another);
unset or ``cpu``, the tests run on the CPU exactly as before. Inside those two folders every
tensor and module a test makes is made on the test device (``torch.set_default_device``), so the
tests make their seeded inputs with :func:`generator`, read values back with :func:`to_numpy`
and bring NumPy arrays in with ``torch.as_tensor`` (``torch.from_numpy`` and
``torch.Generator()`` are CPU-only; ``tests/test_device_switch.py`` holds the folders to that).
Tests of the compiled CPU kernels skip on another device. A value that names no device, or a
GPU that torch cannot see, stops the run with an error instead of quietly testing the CPU.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import pytest
import torch

VARIABLE = "NORMLAB_TEST_DEVICE"
#: The test folders whose tests run on the test device (the others stay on the CPU).
DEVICE_FOLDERS = ("conformance", "layers")


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


def to_numpy(t: torch.Tensor | None) -> np.ndarray | None:
    """A float64 NumPy copy of ``t`` from any device (None stays None)."""
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


cpu_only = pytest.mark.skipif(TEST_DEVICE.type != "cpu",
                              reason=f"tests normlab's CPU kernels or CPU numbers: {VARIABLE}={TEST_DEVICE}")


@pytest.fixture(autouse=True, scope="package")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for a device folder's package (its conftest imports this fixture).

    The layer tests use many tiny tensors; on a shared 2-core machine torch's OpenMP threads then
    spend most of their time waiting for each other (a 0.2 ms forward took 40 ms under load), and
    the conformance suite went from ~20 s to minutes. One thread also fixes the reduction order,
    so the float32 tolerances are exercised deterministically. The previous setting is restored.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
