"""Issue 15 item 9: NORMLAB_TEST_DEVICE picks the device of the conformance harness; a device
that cannot be had stops the run with a clear error instead of quietly testing the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import device_switch
from device_switch import default_device, device_from_env, generator


@pytest.mark.parametrize("environ", [{}, {"NORMLAB_TEST_DEVICE": ""}, {"NORMLAB_TEST_DEVICE": "cpu"},
                                     {"NORMLAB_TEST_DEVICE": " CPU "}])
def test_item_9_default_and_cpu_are_the_cpu(environ):
    assert device_from_env(environ) == torch.device("cpu")


@pytest.mark.parametrize("name", ["tpu", "gpu", "cuda0", "mps:0"])
def test_item_9_an_unknown_device_is_an_error(name):
    with pytest.raises(ValueError, match=rf"NORMLAB_TEST_DEVICE='{name}' is not a test device; use cpu .*cuda"):
        device_from_env({"NORMLAB_TEST_DEVICE": name})


def test_item_9_cuda_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"NORMLAB_TEST_DEVICE=cuda asks for a GPU, but torch .* sees no CUDA GPU"):
        device_from_env({"NORMLAB_TEST_DEVICE": "cuda"})


def test_item_9_cuda_index_must_exist(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_from_env({"NORMLAB_TEST_DEVICE": "cuda"}) == torch.device("cuda")
    assert device_from_env({"NORMLAB_TEST_DEVICE": "cuda:0"}) == torch.device("cuda", 0)
    with pytest.raises(ValueError, match=r"NORMLAB_TEST_DEVICE=cuda:1 asks for a GPU, but .* sees 1 CUDA device"):
        device_from_env({"NORMLAB_TEST_DEVICE": "cuda:1"})


def test_item_9_default_device_makes_tensors_and_modules_there_and_restores():
    # "meta" stands in for a GPU here: any device but the CPU goes through the same switch
    with default_device(torch.device("meta")):
        assert torch.randn(3).device.type == "meta"
        assert torch.nn.BatchNorm1d(4).running_mean.device.type == "meta"
    assert torch.randn(3).device.type == "cpu" and torch.get_default_device().type == "cpu"


def test_item_9_on_the_cpu_the_generator_gives_torchs_numbers():
    """NORMLAB_TEST_DEVICE unset: the harness's inputs are the ones it always had."""
    torch.testing.assert_close(torch.randn(5, generator=generator(3)),
                               torch.randn(5, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the variable would be honoured")
def test_item_9_pytest_refuses_cuda_without_a_gpu():
    tests = Path(__file__).parent
    env = {**os.environ, "NORMLAB_TEST_DEVICE": "cuda"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / "test_stats.py")],
                          capture_output=True, text=True, env=env, cwd=tests.parent, timeout=300)
    assert done.returncode != 0 and "passed" not in done.stdout
    assert "NORMLAB_TEST_DEVICE=cuda asks for a GPU" in done.stdout + done.stderr


def test_item_9_this_run_uses_the_variable():
    assert device_switch.TEST_DEVICE == device_from_env()
