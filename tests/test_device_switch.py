"""Issue 15 item 9: NORMLAB_TEST_DEVICE picks the device of the conformance harness; a device
that cannot be had stops the run with a clear error instead of quietly testing the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import device_switch
import pytest
import torch
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


# -- the device folders make nothing on the host by accident ----------------------------------

_FACTORIES = {"tensor", "as_tensor", "randn", "rand", "randint", "zeros", "ones", "empty", "full", "arange",
              "linspace", "eye", "randn_like", "zeros_like", "ones_like"}


def _host_only_calls(source: str) -> list[str]:
    """Lines of ``source`` that would make or read a tensor on the CPU whatever the test device:
    ``torch.Generator()`` without a device, ``torch.from_numpy``, ``.numpy()`` not after
    ``.cpu()``, a literal ``device="cpu"``, and tensors made at import time (before the test
    device is set). Functions marked ``cpu_only`` may do all of these."""
    import ast

    tree = ast.parse(source)
    found: list[str] = []

    def dotted(node: ast.AST) -> str:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name):
            parts.append(node.id)
        return ".".join(reversed(parts))

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if any(dotted(d) == "cpu_only" for d in node.decorator_list):
                return
            for child in node.body:
                visit(child, True)
            return
        if isinstance(node, ast.Lambda):
            in_function = True
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            keywords = {k.arg for k in node.keywords}
            if name == "torch.Generator" and "device" not in keywords:
                found.append(f"line {node.lineno}: torch.Generator() without a device (use device_switch.generator)")
            if name == "torch.from_numpy":
                found.append(f"line {node.lineno}: torch.from_numpy makes a CPU tensor (use torch.as_tensor)")
            if (isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                    and not (isinstance(node.func.value, ast.Call) and dotted(node.func.value.func).endswith("cpu"))):
                found.append(f"line {node.lineno}: .numpy() of a tensor that may be on a GPU (use to_numpy or .cpu())")
            for k in node.keywords:
                if k.arg == "device" and isinstance(k.value, ast.Constant) and k.value.value == "cpu":
                    found.append(f"line {node.lineno}: device='cpu' (the test device is torch's default device)")
            if not in_function and name.startswith("torch.") and name.split(".")[-1] in _FACTORIES:
                found.append(f"line {node.lineno}: {name} at import time makes a CPU tensor (make it inside the test)")
        for child in ast.iter_child_nodes(node):
            visit(child, in_function)

    visit(tree, False)
    return found


def _device_folder_sources() -> list[Path]:
    tests = Path(__file__).parent
    helpers = [tests / "variant_helpers.py", tests / "torch_pairs.py"]
    return helpers + sorted(p for folder in device_switch.DEVICE_FOLDERS for p in (tests / folder).glob("*.py"))


def test_item_9_the_scan_finds_each_host_only_call():
    bad = """
import torch
X = torch.randn(3)
def f(t):
    g = torch.Generator().manual_seed(0)
    a = torch.from_numpy(t.numpy())
    b = t.detach().numpy()
    c = torch.zeros(2, device="cpu")
    ok = (t.cpu().numpy(), torch.Generator(device=t.device), lambda: torch.zeros(1), torch.as_tensor(a))
@cpu_only
def g(t):
    return t.numpy(), torch.Generator()
"""
    assert [line.split(":")[0] for line in _host_only_calls(bad)] == [
        "line 3", "line 5", "line 6", "line 6", "line 7", "line 8"]


@pytest.mark.parametrize("path", _device_folder_sources(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_item_9_device_folder_tests_make_their_tensors_on_the_test_device(path):
    """Every tensor a device-folder test makes follows NORMLAB_TEST_DEVICE, so a run on a GPU tests
    the GPU and fails only where the layers do (no test can check this without a GPU but this one)."""
    problems = _host_only_calls(path.read_text())
    assert not problems, f"{path.name}:\n" + "\n".join(problems)
