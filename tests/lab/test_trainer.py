"""The trainer: seeded determinism, metrics rows, and resume after an interruption (in-process and killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.lab.config import ConfigError
from normlab.lab.runfiles import read_jsonl
from normlab.lab import job as job_module
from normlab.lab.trainer import BatchSampler, Interrupted, Trainer

from .small import EXPERIMENT, SMALL, small_config


def comparable(rows):
    """Rows without wall time (the only field that may differ between equal runs), in a fixed order."""
    return sorted(({k: v for k, v in r.items() if k != "wall_time"} for r in rows),
                  key=lambda r: (r["arm"], r["seed"], r["step"]))


@pytest.fixture(scope="module")
def reference_rows(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref")
    return Trainer(EXPERIMENT, small_config(), run / "run", progress=False).run()


def test_rows_cover_every_job_and_evaluation(reference_rows):
    keys = {(r["arm"], r["seed"], r["step"]) for r in reference_rows}
    assert keys == {(a, s, t) for a in ("none", "batch") for s in (0, 1) for t in range(0, 41, 5)}
    row = next(r for r in reference_rows if r["step"] == 40)
    assert set(row) == {"step", "arm", "seed", "train_loss", "train_loss_sd", "test_loss", "test_acc", "wall_time", "probes"}
    assert set(row["probes"]) == {"sigmoid_input_p15", "sigmoid_input_p50", "sigmoid_input_p85"}
    assert row["probes"]["sigmoid_input_p15"] <= row["probes"]["sigmoid_input_p50"] <= row["probes"]["sigmoid_input_p85"]
    assert 0.0 <= row["test_acc"] <= 1.0 and row["train_loss"] > 0


def test_same_seed_same_metrics(tmp_path, reference_rows):
    again = Trainer(EXPERIMENT, small_config(), tmp_path / "run", progress=False).run()
    assert comparable(again) == comparable(reference_rows)


def test_different_seed_different_metrics(reference_rows):
    final = {(r["arm"], r["seed"]): r["test_loss"] for r in reference_rows if r["step"] == 40}
    assert final[("batch", 0)] != final[("batch", 1)]


def test_arms_of_one_seed_share_initial_weights(reference_rows):
    # Only the norm differs between arms, and batch norm starts as the identity on the batch
    # statistics: at step 0 (eval mode with fresh running stats: mean 0, var 1) the arms agree.
    start = {(r["arm"], r["seed"]): r["test_loss"] for r in reference_rows if r["step"] == 0}
    assert start[("none", 0)] == pytest.approx(start[("batch", 0)], rel=1e-4)


def test_resume_after_in_process_interruption_gives_the_same_metrics(tmp_path, reference_rows, monkeypatch):
    run = tmp_path / "run"
    trainer = Trainer(EXPERIMENT, small_config(), run, progress=False)
    evaluate = job_module._evaluate
    calls = {"n": 0}

    def evaluate_then_signal(*args):
        calls["n"] += 1
        if calls["n"] == 14:  # in the second job, between checkpoints (step 20 of 'batch' seed 0)
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C would: the job checkpoints and stops
        return evaluate(*args)

    monkeypatch.setattr(job_module, "_evaluate", evaluate_then_signal)
    with pytest.raises(Interrupted, match="checkpoint saved"):
        trainer.run()
    monkeypatch.setattr(job_module, "_evaluate", evaluate)
    finished_before = [r for r in read_jsonl(run / "metrics.jsonl") if r["arm"] == "none" and r["seed"] == 0]
    resumed = Trainer(EXPERIMENT, small_config(), run, resume=True, progress=False).run()
    assert comparable(resumed) == comparable(reference_rows)
    # The finished job was not redone: its rows are byte-for-byte the same, wall time included.
    assert [r for r in resumed if r["arm"] == "none" and r["seed"] == 0] == finished_before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_resume_after_the_process_is_killed(tmp_path, reference_rows, sig):
    run = tmp_path / "run"
    sets = [f"--set={k}={v}" for k, v in SMALL.items() if k != "train.steps"]
    cmd = [sys.executable, "-m", "normlab", "run", "ioffe2015-mnist", "--quick", "--no-progress",
           "--out", str(run), "--steps", "40", *[s.replace(" ", "") for s in sets]]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    metrics = Path(run) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(read_jsonl(metrics, warn=False)) >= 12:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and b"--resume" in err
    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert comparable(read_jsonl(metrics)) == comparable(reference_rows)


def test_resume_with_a_different_config_is_refused(tmp_path):
    run = tmp_path / "run"
    Trainer(EXPERIMENT, small_config(**{"train.steps": 5, "train.seeds": 1}), run, progress=False).run()
    with pytest.raises(ConfigError, match=r"different config \(differs in train.lr\)"):
        Trainer(EXPERIMENT, small_config(**{"train.steps": 5, "train.seeds": 1, "train.lr": 0.1}), run,
                resume=True, progress=False).run()
    with pytest.raises(ConfigError, match="already holds a run; continue it with --resume"):
        Trainer(EXPERIMENT, small_config(**{"train.steps": 5, "train.seeds": 1}), run, progress=False).run()


def test_batch_sampler_state_round_trip():
    a = BatchSampler(10, 3, seed=0)
    for _ in range(4):
        a.next()
    b = BatchSampler(10, 3, seed=99)
    b.load_state_dict(a.state_dict())
    assert all(a.next().tolist() == b.next().tolist() for _ in range(10))


def test_batch_larger_than_data_is_refused():
    with pytest.raises(ConfigError, match="batch_size=20 exceeds the 10 training samples"):
        BatchSampler(10, 20, seed=0)


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="device 'cuda' was asked for but torch sees no CUDA GPU"):
        Trainer(EXPERIMENT, small_config(**{"train.device": "cuda"}), tmp_path / "run", progress=False)


def test_a_diverging_job_stops_and_says_so(tmp_path):
    config = small_config(**{"train.lr": 1e30, "model.activation": "relu", "train.seeds": 1})
    rows = Trainer(EXPERIMENT, config, tmp_path / "run", progress=False).run()
    none = [r for r in rows if r["arm"] == "none"]
    assert none[-1]["diverged"] is True and none[-1]["train_loss"] is None
    assert none[-1]["step"] < 40 and all(not r.get("diverged") for r in none[:-1])
    text = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: non-finite values are null


def test_train_loss_sd_is_the_spread_of_the_steps_since_the_last_evaluation(reference_rows):
    rows = [r for r in reference_rows if r["step"] > 0]
    assert all(r["train_loss_sd"] >= 0 for r in rows)
    assert any(r["train_loss_sd"] > 0 for r in rows)
    assert all(r["train_loss_sd"] is None for r in reference_rows if r["step"] == 0)
