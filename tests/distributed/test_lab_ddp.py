"""The lab under torchrun: two processes with --sync-bn match one process on the same global
batch; without it the per-process statistics show; a stopped run resumes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ARGS = ["run", "ioffe2015-mnist", "--quick", "--no-progress", "--steps", "30", "--seeds", "1",
        "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10", "--data", "synthetic"]


def normlab(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "normlab", *args], capture_output=True, text=True,
                          timeout=300, env=env, **kw)


def metrics(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {(r["arm"], r["seed"], r["step"]): r for r in rows}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    done = {}
    for name, extra in {"single": ["--sync-bn"], "sync": ["--nproc", "2", "--sync-bn"], "local": ["--nproc", "2"]}.items():
        result = normlab(*ARGS, *extra, "--out", str(root / name))
        assert result.returncode == 0, result.stderr[-3000:]
        done[name] = metrics(root / name)
    return done


def test_two_processes_with_sync_bn_match_one_process(runs):
    single, sync = runs["single"], runs["sync"]
    assert single.keys() == sync.keys()
    for key, row in single.items():
        assert sync[key]["test_loss"] == pytest.approx(row["test_loss"], rel=1e-4, abs=1e-5), key
        assert sync[key]["test_acc"] == pytest.approx(row["test_acc"], abs=2e-3), key
        if row["train_loss"] is not None:
            assert sync[key]["train_loss"] == pytest.approx(row["train_loss"], rel=1e-4), key


def test_without_sync_bn_the_per_process_statistics_show(runs):
    single, local = runs["single"], runs["local"]
    # the plain MLP arm has no batch norm: identical; the BN arm normalizes with half-batch statistics
    assert local[("none", 0, 30)]["test_loss"] == pytest.approx(single[("none", 0, 30)]["test_loss"], rel=1e-4)
    gap = abs(local[("batch", 0, 30)]["test_loss"] - single[("batch", 0, 30)]["test_loss"])
    assert gap > 1e-3


def test_stopped_ddp_run_resumes_to_the_same_metrics(tmp_path, runs):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:  # torchrun's --master-port 0 leaves the workers waiting
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", port, "-m", "normlab", *ARGS, "--sync-bn", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if any((out / "jobs").glob("*.jsonl")):  # the first job finished: stop inside the second
            break
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert len((out / "metrics.jsonl").read_text().splitlines()) < len(runs["sync"]), "stopped too late to test"
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed, uninterrupted = metrics(out), runs["sync"]
    assert resumed.keys() == uninterrupted.keys()
    for key, row in uninterrupted.items():
        assert resumed[key]["test_loss"] == pytest.approx(row["test_loss"], rel=1e-5), key
