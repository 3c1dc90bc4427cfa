"""SyncBatchNorm with real processes (gloo on localhost): equal to one process holding the
concatenated batch, with uneven and empty per-process batches; a dead peer fails clearly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import normlab

WORKER = Path(__file__).with_name("sync_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, world: int) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def single_process(spec: dict) -> dict:
    """The oracle: one normlab BatchNorm (held to torch.nn in the conformance suite) on the whole batch."""
    channels, sizes, bias = spec["channels"], spec["sizes"], spec.get("bias", True)
    cls = {0: normlab.BatchNorm1d, 1: normlab.BatchNorm1d, 2: normlab.BatchNorm2d}[len(spec["rest"])]
    bn = cls(channels, momentum=0.3, bias=bias).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, channels, dtype=torch.float64))
        if bias:
            bn.bias.copy_(torch.linspace(-0.2, 0.3, channels, dtype=torch.float64))
    steps = []
    for step in range(spec["steps"]):
        g = torch.Generator().manual_seed(step)
        x = (torch.randn(sum(sizes), channels, *spec["rest"], generator=g, dtype=torch.float64) * 2 + 1).requires_grad_()
        upstream = torch.randn(x.shape, generator=g, dtype=torch.float64)
        for param in bn.parameters():
            param.grad = None
        y = bn(x)
        (y * upstream).sum().backward()
        steps.append({"y": y.detach(), "dx": x.grad, "dw": bn.weight.grad.clone(),
                      "db": None if bn.bias is None else bn.bias.grad.clone()})
    return {"steps": steps, "running_mean": bn.running_mean, "running_var": bn.running_var, "count": bn.num_batches_tracked}


@pytest.mark.parametrize(
    "sizes, rest, channels_last, bias",
    [([5, 3], [4, 4], False, True), ([4, 0, 6], [5], False, True), ([3, 2], [], False, True),
     ([2, 6, 1], [3, 3], True, True), ([5, 3], [4], False, False)],
    ids=["2proc-NCHW-uneven", "3proc-NCL-empty-rank", "2proc-NC", "3proc-channels_last",
         "2proc-NCL-bias=False"],  # issue 15: a weight without a bias
)
def test_equals_one_process_on_the_concatenated_batch(tmp_path, sizes, rest, channels_last, bias):
    world = len(sizes)
    spec = {"sizes": sizes, "rest": rest, "channels": 3, "steps": 2, "out": str(tmp_path / "r"),
            "channels_last": channels_last, "bias": bias}
    procs = launch(spec, world)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = [torch.load(f"{spec['out']}.{r}") for r in range(world)]
    want = single_process(spec)
    starts = [sum(sizes[:r]) for r in range(world)]
    for step, expected in enumerate(want["steps"]):
        for r in range(world):
            mine = got[r]["steps"][step]
            part = slice(starts[r], starts[r] + sizes[r])
            torch.testing.assert_close(mine["y"], expected["y"][part], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine["dx"], expected["dx"][part], rtol=1e-5, atol=1e-5)
        # weight/bias gradients: each process holds its contribution; together they are the whole
        torch.testing.assert_close(sum(g["steps"][step]["dw"] for g in got), expected["dw"], rtol=1e-5, atol=1e-5)
        if bias:
            torch.testing.assert_close(sum(g["steps"][step]["db"] for g in got), expected["db"], rtol=1e-5, atol=1e-5)
        else:
            assert all(g["steps"][step]["db"] is None for g in got)
    for r in range(world):
        torch.testing.assert_close(got[r]["running_mean"], want["running_mean"].to(got[r]["running_mean"].dtype), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[r]["running_var"], want["running_var"].to(got[r]["running_var"].dtype), rtol=1e-5, atol=1e-6)
        assert int(got[r]["count"]) == int(want["count"]) == 2


def test_a_dead_peer_fails_clearly_instead_of_hanging(tmp_path):
    spec = {"sizes": [4, 4], "rest": [3], "channels": 2, "steps": 1, "out": str(tmp_path / "r"),
            "die": True, "timeout": 10}
    start = time.monotonic()
    survivor, dead = launch(spec, 2)
    _, err = survivor.communicate(timeout=90)
    dead.communicate(timeout=30)
    assert survivor.returncode != 0
    assert "synchronizing batch statistics across 2 processes failed" in err, err[-2000:]
    assert time.monotonic() - start < 90


def test_without_a_process_group_it_is_batch_norm():
    x = torch.randn(6, 3, 4)
    sync, plain = normlab.SyncBatchNorm(3), normlab.BatchNorm1d(3)
    plain.load_state_dict(sync.state_dict())
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)


def _filled(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and buffer set to values no freshly made layer has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
            else:
                tensor.fill_(seed + 7)
    return module


def test_item_9_state_dict_matches_torch_sync_batch_norm():
    """Issue 15 item 9: this asserted ``load_state_dict(...) is not None``, which is always true.
    Now: the same keys, and every value carried over in both directions (torch is the oracle)."""
    ours, theirs = normlab.SyncBatchNorm(5), _filled(torch.nn.SyncBatchNorm(5), 1)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    result = ours.load_state_dict(theirs.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    _filled(ours, 2)
    theirs.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(theirs.state_dict()[key], value), key
    # not a torch.nn.SyncBatchNorm subclass: DistributedDataParallel refuses those on the CPU
    assert not isinstance(ours, torch.nn.SyncBatchNorm)
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)


def test_masked_statistics_across_processes(tmp_path):
    """Padded sequences split unevenly over 3 processes (one empty): equal to one process's
    masked batch norm over the whole batch; the padding (NaN here) changes nothing."""
    sizes, length = [4, 0, 5], 6
    spec = {"sizes": sizes, "rest": [length], "channels": 3, "steps": 2, "out": str(tmp_path / "r"), "masked": True}
    procs = launch(spec, 3)
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    got = [torch.load(f"{spec['out']}.{r}") for r in range(3)]
    bn = normlab.BatchNorm1d(3, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, 3, dtype=torch.float64))
    starts = [0, 4, 4]
    for step in range(2):
        g = torch.Generator().manual_seed(step)
        full = torch.randn(9, 3, length, generator=g, dtype=torch.float64) * 2 + 1
        upstream = torch.randn(full.shape, generator=g, dtype=torch.float64)
        lengths = torch.randint(0, length + 1, (9,), generator=g)
        mask = torch.arange(length)[None, :] < lengths[:, None]
        x = full.clone().requires_grad_()
        bn.weight.grad = bn.bias.grad = None
        y = bn(x, mask)
        (y * upstream).sum().backward()
        for r in (0, 2):
            part = slice(starts[r], starts[r] + sizes[r])
            torch.testing.assert_close(got[r]["steps"][step]["y"], y.detach()[part], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got[r]["steps"][step]["dx"], x.grad[part], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sum(g_["steps"][step]["dw"] for g_ in got), bn.weight.grad, rtol=1e-5, atol=1e-5)
    for r in range(3):
        torch.testing.assert_close(got[r]["running_mean"], bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[r]["running_var"], bn.running_var, rtol=1e-5, atol=1e-6)
