"""Executors: worker processes give the metrics of one process; a failing job or a dying worker
fails the run with a clear error and keeps finished work; a stopped run resumes to the same metrics."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.lab.config import ConfigError
from normlab.lab.executor import JobFailed, ProcessExecutor, default_jobs, make_executor
from normlab.lab.runfiles import read_jsonl
from normlab.lab.trainer import Trainer, job_key, plan_jobs

from .small import EXPERIMENT, SMALL, small_config


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


@pytest.fixture(scope="module")
def inline_rows(tmp_path_factory):
    return Trainer(EXPERIMENT, small_config(), tmp_path_factory.mktemp("inline") / "run", progress=False, jobs=1).run()


def test_worker_processes_give_the_metrics_of_one_process(tmp_path, inline_rows):
    rows = Trainer(EXPERIMENT, small_config(), tmp_path / "run", progress=False, jobs=2).run()
    # Same rows in the same order (the file is in job order, whatever order the jobs finished in).
    assert comparable(rows) == comparable(inline_rows)
    assert len(rows) == 2 * 2 * 9


def test_a_grid_runs_every_arm_at_every_point(tmp_path):
    config = small_config(**{"train.steps": 10, "train.seeds": 1})
    config.grid = {"train.lr": [0.1, 1.0]}
    rows = Trainer(EXPERIMENT, config, tmp_path / "run", progress=False, jobs=2).run()
    assert {(r["arm"], r["point"]["train.lr"]) for r in rows} == {(a, lr) for a in ("none", "batch") for lr in (0.1, 1.0)}
    finals = {(r["arm"], r["point"]["train.lr"]): r["test_loss"] for r in rows if r["step"] == 10}
    assert finals[("batch", 0.1)] != finals[("batch", 1.0)]  # the point's learning rate was used
    assert sorted(p.name for p in (tmp_path / "run" / "jobs").iterdir()) == sorted(
        f"{job_key(a, {'train.lr': lr}, 0)}.jsonl" for a in ("none", "batch") for lr in (0.1, 1.0))


def test_a_bad_grid_axis_is_refused_before_anything_runs(tmp_path):
    config = small_config()
    config.grid = {"train.lrr": [0.1]}
    with pytest.raises(ConfigError, match=r"unknown grid axis 'train.lrr'; a grid axis is a config key"):
        Trainer(EXPERIMENT, config, tmp_path / "run", progress=False)
    config.grid = {"train.lr": []}
    with pytest.raises(ConfigError, match=r"grid axis 'train.lr' must be a non-empty list"):
        Trainer(EXPERIMENT, config, tmp_path / "run", progress=False)
    config.grid = {"model.activation": ["relu", "swish"]}
    with pytest.raises(ConfigError, match=r"model.activation must be one of .* got 'swish'"):
        Trainer(EXPERIMENT, config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failing_job_fails_the_run_names_it_and_keeps_finished_work(tmp_path, inline_rows, jobs):
    run = tmp_path / "run"
    bad = run / "checkpoints" / "none-seed1.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")  # a corrupt checkpoint: loading it raises inside the job
    with pytest.raises(JobFailed, match=r"job ioffe2015-mnist: arm 'none', seed 1 failed: CheckpointError: cannot "
                                        r"resume from a job.s checkpoint; delete it to train the job again from the "
                                        r"start: .*none-seed1.pt' is not a PyTorch checkpoint.*"
                                        r"\(traceback: .*none-seed1.txt\)"):
        Trainer(EXPERIMENT, small_config(), run, progress=False, jobs=jobs).run()
    error = (run / "errors" / "none-seed1.txt").read_text()
    assert "Traceback" in error and "UnpicklingError" in error
    kept = {(r["arm"], r["seed"]) for r in read_jsonl(run / "metrics.jsonl")}
    # Jobs that finished before are kept; in parallel, a job still running was stopped at a checkpoint.
    assert ("none", 1) not in kept and (kept == {("none", 0), ("batch", 0)} if jobs == 1 else kept)
    bad.unlink()
    rows = Trainer(EXPERIMENT, small_config(), run, resume=True, progress=False, jobs=jobs).run()
    assert comparable(rows) == comparable(inline_rows)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _cli(run: Path, *extra: str) -> list[str]:
    sets = [f"--set={k}={str(v).replace(' ', '')}" for k, v in SMALL.items() if k not in ("train.steps", "train.seeds")]
    return [sys.executable, "-m", "normlab", "run", "ioffe2015-mnist", "--quick", "--no-progress", "--out", str(run),
            "--steps", "40", "--seeds", "2", *sets, *extra]


def _wait_for(path_glob, run: Path, proc, count: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if len(list(run.glob(path_glob))) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"the run never wrote {count} {path_glob}: {proc.communicate(timeout=60)}")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds worker processes through /proc")
def test_a_killed_worker_fails_the_run_clearly_and_resume_finishes_it(tmp_path, inline_rows):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, "--jobs", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for("jobs/*.jsonl", run, proc, 1)
    spawned = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    assert spawned, "no worker process found"
    os.kill(spawned[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    if proc.returncode == 0:
        pytest.skip("the run finished before the worker was killed")
    assert proc.returncode == 3, err
    assert "a worker process died (killed, or out of memory) while running" in err and "--resume" in err
    assert "Traceback" not in err
    resumed = subprocess.run(_cli(run, "--jobs", "2", "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_jsonl(run / "metrics.jsonl")) == comparable(inline_rows)


def test_ctrl_c_stops_every_worker_and_resume_redoes_no_finished_job(tmp_path, inline_rows):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, "--jobs", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for("jobs/*.jsonl", run, proc, 1)
    workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before Ctrl-C")
    assert proc.returncode == 130 and "--resume" in err, err
    assert workers and not [p for p in workers if Path(f"/proc/{p}").exists()]  # every worker has exited
    finished = {p.name: p.read_text() for p in (run / "jobs").iterdir()}
    resumed = subprocess.run(_cli(run, "--jobs", "2", "--resume"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_jsonl(run / "metrics.jsonl")) == comparable(inline_rows)
    for name, text in finished.items():  # finished jobs were not redone: their rows, wall time included, are as before
        assert (run / "jobs" / name).read_text() == text


def test_jobs_plan_covers_seeds_points_and_arms():
    config = small_config(**{"train.seeds": 2, "train.first_seed": 5})
    config.grid = {"train.lr": [0.1, 1.0]}
    keys = [job.key for job in plan_jobs(config, "runs/x")]
    assert keys == [f"{arm}-lr={lr:g}-seed{seed}" for seed in (5, 6) for lr in (0.1, 1.0) for arm in ("none", "batch")]


def test_executor_choice_and_arguments():
    assert type(make_executor(1)).__name__ == "InlineExecutor"
    assert isinstance(make_executor(3), ProcessExecutor) and make_executor(3).workers == 3
    assert default_jobs() >= 1
    with pytest.raises(ValueError, match="at least 1 worker, got 0"):
        ProcessExecutor(0)
    with pytest.raises(ConfigError, match="--jobs must be at least 1, got 0"):
        Trainer(EXPERIMENT, small_config(), "unused", progress=False, jobs=0)
