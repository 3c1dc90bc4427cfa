"""Issue 17: the lab's jobs as Ray tasks on a real cluster started here, over loopback only.

One cluster for the module: a head at 127.0.0.2 and a second node at 127.0.0.3, 1 CPU each,
started with ``ray start`` (:mod:`tests.lab.ray_cluster`) and killed by pid in the fixture's
finalizer, also when a test fails. Every run is held against the local executor's metrics.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

import normlab
from normlab.cli import main
from normlab.lab.executor import JobFailed
from normlab.lab.job import Interrupted
from normlab.lab.runfiles import read_jsonl
from normlab.lab.trainer import Trainer

from .ray_cluster import HEAD_IP, LocalCluster, ray_environment
from .small import EXPERIMENT, small_config

ray = pytest.importorskip("ray", reason="the Ray executor's tests need Ray: pip install 'normlab[ray]'")
from normlab.lab._ray_remote import code_digest, probe_node  # noqa: E402
from normlab.lab.ray_executor import RayExecutor  # noqa: E402

SECOND_IP = "127.0.0.3"
SRC = str(Path(normlab.__file__).resolve().parents[1])
# Long enough jobs (seconds each) that a test can act while they run.
# Long enough that an interrupt a moment after training starts finds the jobs running, on a quiet
# machine too (1,500 steps were done within the second the test waits).
LONG_STEPS = 5000
LONG = {"train.steps": LONG_STEPS, "train.seeds": 1, "train.eval_every": 1000, "train.checkpoint_every": 1000}


def comparable(rows):
    return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


@pytest.fixture(scope="module")
def cluster(request):
    # A short folder: Ray's socket paths under it must stay within 107 bytes.
    temp = Path(tempfile.mkdtemp(prefix="nlray-", dir="/tmp"))
    pythonpath = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    environment = ray_environment(temp)
    environment.__enter__()
    started = None

    def stop():
        if started is not None:
            started.stop()
        environment.__exit__(None, None, None)
        shutil.rmtree(temp, ignore_errors=True)

    request.addfinalizer(stop)  # before anything can fail
    started = LocalCluster(temp, pythonpath=pythonpath)
    started.add_node(SECOND_IP)
    started.connect()
    started.wait_for(2)
    return started


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory):
    return Trainer(EXPERIMENT, small_config(), tmp_path_factory.mktemp("local") / "run", progress=False).run()


@pytest.fixture(scope="module")
def long_local_rows(tmp_path_factory):
    return Trainer(EXPERIMENT, small_config(**LONG), tmp_path_factory.mktemp("long") / "run", progress=False).run()


def _train_processes(cluster):
    import psutil

    found = []
    for pid in cluster.pids():
        try:
            if psutil.Process(pid).name() == "ray::_train":
                found.append(pid)
        except psutil.NoSuchProcess:
            pass
    return found


def _wait_for_training(cluster, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = _train_processes(cluster)
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError("no Ray task started training")


def test_issue17_metrics_on_two_loopback_nodes_equal_the_local_executors(cluster, local_rows, tmp_path):
    executor = RayExecutor(cluster.address)
    rows = Trainer(EXPERIMENT, small_config(), tmp_path / "run", progress=False, executor=executor).run()
    assert comparable(rows) == comparable(local_rows)
    run = tmp_path / "run"
    # The driver wrote the run folder as a local run does: rows per job and each job's last checkpoint.
    assert sorted(p.name for p in (run / "jobs").iterdir()) == ["batch-seed0.jsonl", "batch-seed1.jsonl",
                                                                "none-seed0.jsonl", "none-seed1.jsonl"]
    state = torch.load(run / "checkpoints" / "batch-seed1.pt", weights_only=True)
    assert state["step"] == 40 and comparable(state["rows"]) == comparable([r for r in local_rows
                                                                           if (r["arm"], r["seed"]) == ("batch", 1)])
    log = (run / "log.txt").read_text()
    assert f"4 jobs on the Ray cluster at {cluster.address}" in log
    # Both nodes trained (each has one CPU, so two jobs at once go one to each).
    assert {line.rsplit(" ", 1)[-1] for line in log.splitlines() if " ran on " in line} == {HEAD_IP, SECOND_IP}
    assert executor.retries == 0


def test_issue17_cluster_nodes_and_connections_are_loopback_only(cluster, local_rows, tmp_path):
    import psutil

    addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert addresses == {HEAD_IP, SECOND_IP}
    remote_ends = set()
    done = threading.Event()

    def watch():  # every TCP connection of the cluster's processes and of this driver, during a run
        while not done.is_set():
            for pid in cluster.pids() | {os.getpid()}:
                try:
                    remote_ends.update(c.raddr.ip for c in psutil.Process(pid).net_connections("tcp") if c.raddr)
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    pass
            time.sleep(0.1)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        rows = Trainer(EXPERIMENT, small_config(), tmp_path / "run", progress=False,
                       executor=RayExecutor(cluster.address)).run()
    finally:
        done.set()
        watcher.join()
    assert comparable(rows) == comparable(local_rows)
    assert remote_ends, "no connection seen"
    not_loopback = {ip for ip in remote_ends if not ipaddress.ip_address(ip.removeprefix("::ffff:")).is_loopback}
    assert not not_loopback, f"connections left the loopback interface: {not_loopback}"


def test_issue17_a_killed_worker_is_retried_counted_and_the_metrics_are_unchanged(cluster, long_local_rows, tmp_path):
    executor = RayExecutor(cluster.address)
    result: dict = {}

    def run():
        try:
            result["rows"] = Trainer(EXPERIMENT, small_config(**LONG), tmp_path / "run", progress=False,
                                     executor=executor).run()
        except BaseException as err:  # noqa: BLE001 - re-raised in the test's thread
            result["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    try:
        victim = _wait_for_training(cluster)[0]
        # Kill it once both jobs have begun and reported steps (a worker killed before its task
        # began has done no work, and no attempt of it is counted).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            board = executor._board_of[1] if executor._board_of else None
            steps, begun = ray.get(board.state.remote()) if board else (0, [])
            if steps > 0 and len(begun) == 2:
                break
            time.sleep(0.05)
        os.kill(victim, signal.SIGKILL)
    finally:
        thread.join(timeout=300)
    assert "error" not in result, result.get("error")
    assert comparable(result["rows"]) == comparable(long_local_rows)
    assert executor.retries == 1
    assert "retried 1 time(s) after its worker or node died" in (tmp_path / "run" / "log.txt").read_text()


def test_issue17_a_failing_job_fails_the_ray_run_with_its_error(cluster, local_rows, tmp_path):
    run = tmp_path / "run"
    bad = run / "checkpoints" / "none-seed1.pt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not a checkpoint")  # loading it raises inside the task
    expected = (r"job ioffe2015-mnist: arm 'none', seed 1 failed: CheckpointError: cannot resume from a job.s "
                r"checkpoint; delete it to train the job again from the start: '.*none-seed1.pt' is not a PyTorch "
                r"checkpoint.*\(traceback: .*none-seed1.txt\)")
    with pytest.raises(JobFailed, match=expected) as failed:
        Trainer(EXPERIMENT, small_config(), run, progress=False, executor=RayExecutor(cluster.address)).run()
    assert f"'{run / 'checkpoints' / 'none-seed1.pt'}' is not a PyTorch checkpoint" in str(failed.value)  # not the node's scratch
    assert "UnpicklingError" in (run / "errors" / "none-seed1.txt").read_text()
    bad.unlink()
    rows = Trainer(EXPERIMENT, small_config(), run, resume=True, progress=False,
                   executor=RayExecutor(cluster.address)).run()
    assert comparable(rows) == comparable(local_rows)


def test_issue17_ctrl_c_checkpoints_and_resume_continues_on_ray_or_locally(cluster, long_local_rows, tmp_path):
    run = tmp_path / "run"
    config = small_config(**LONG)

    def interrupt():
        _wait_for_training(cluster)
        time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGINT)  # as a terminal's Ctrl-C: the handler runs in the main thread

    # A SIGINT that came after the run (it cannot, the jobs take seconds) must not stop pytest.
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(Interrupted, match="stopped; every finished job is kept and running ones checkpointed"):
            Trainer(EXPERIMENT, config, run, progress=False, executor=RayExecutor(cluster.address)).run()
    finally:
        signal.signal(signal.SIGINT, previous)
    steps = {p.stem: torch.load(p, weights_only=True)["step"] for p in (run / "checkpoints").glob("*.pt")}
    assert steps and all(0 < s <= LONG_STEPS for s in steps.values()), steps
    assert any(s < LONG_STEPS for s in steps.values()), f"nothing was left to resume: {steps}"
    local = tmp_path / "copy"
    shutil.copytree(run, local)
    rows = Trainer(EXPERIMENT, config, run, resume=True, progress=False, executor=RayExecutor(cluster.address)).run()
    assert comparable(rows) == comparable(long_local_rows)
    rows = Trainer(EXPERIMENT, config, local, resume=True, progress=False, jobs=1).run()
    assert comparable(rows) == comparable(long_local_rows)


def test_issue17_normlab_run_executor_ray_writes_the_report_of_a_local_run(cluster, tmp_path, capsys):
    common = ["run", "ioffe2015-mnist", "--quick", "--no-progress", "--data", "synthetic", "--seeds", "2",
              "--set", "train.steps=40", "--set", "train.eval_every=10", "--set", "model.widths=[16,16]"]
    assert main([*common, "--jobs", "1", "--out", str(tmp_path / "local")]) == 0
    assert main([*common, "--executor", "ray", "--address", cluster.address, "--out", str(tmp_path / "ray")]) == 0
    assert "Ray tasks on the cluster at" in capsys.readouterr().err
    assert comparable(read_jsonl(tmp_path / "ray" / "metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "local" / "metrics.jsonl"))

    def report(name):
        text = (tmp_path / name / "report.md").read_text().replace(str(tmp_path / name), "RUN")
        return [line for line in text.splitlines() if "training time" not in line]

    assert report("ray") == report("local")


def test_issue17_a_suite_on_ray_writes_the_folders_and_index_of_a_local_suite(cluster, tmp_path):
    from normlab.lab.suite import SuiteOptions, run_suite

    options = SuiteOptions(["ioffe2015-mnist"], quick=True, overrides={
        "data.name": "synthetic", "model.widths": [16, 16], "train.steps": 40, "train.seeds": 2,
        "train.eval_every": 10})
    run_suite(tmp_path / "local", options, jobs=1, progress=False)
    run_suite(tmp_path / "ray", options, jobs=1, progress=False, executor=RayExecutor(cluster.address))
    for name in ("local", "ray"):
        assert (tmp_path / name / "ioffe2015-mnist" / "report.html").is_file()
    assert comparable(read_jsonl(tmp_path / "ray" / "ioffe2015-mnist" / "metrics.jsonl")) == comparable(
        read_jsonl(tmp_path / "local" / "ioffe2015-mnist" / "metrics.jsonl"))

    def index(name):
        return (tmp_path / name / "index.md").read_text().replace(str(tmp_path / name), "SUITE")

    assert index("ray") == index("local")


def test_issue17_without_ray_executor_ray_says_how_to_install_it(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    code = main(["run", "ioffe2015-mnist", "--quick", "--executor", "ray", "--out", str(tmp_path / "run")])
    assert code == 2
    assert "--executor ray needs Ray, an optional extra of normlab" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_issue17_ray_options_without_executor_ray_are_refused(capsys):
    assert main(["run", "ioffe2015-mnist", "--quick", "--address", "auto", "--job-cpus", "2"]) == 2
    assert "--address, --job-cpus only apply to --executor ray; add --executor ray or drop them." in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match=r"--job-gpus must be a number of GPUs per job >= 0, got -1; give 0"):
        RayExecutor(job_gpus=-1)


def test_issue17_the_node_check_names_other_code_and_unreadable_data(tmp_path):
    from normlab.lab.config import config_to_dict

    as_dict = config_to_dict(small_config())
    here = code_digest(Path(normlab.__file__).parent)
    assert probe_node(here, [("ioffe2015-mnist", as_dict, "batch", 0, ())])["problems"] == []
    other = probe_node("0" * 16, [])["problems"]
    assert len(other) == 1 and "is not the driver's code (source digest" in other[0]
    as_dict["data"].update(name="mnist", data_dir=str(tmp_path / "nowhere"))
    (problem,) = probe_node(here, [("ioffe2015-mnist", as_dict, "batch", 0, ())])["problems"]
    assert problem.startswith(f"cannot load data set 'mnist' from data_dir '{tmp_path / 'nowhere'}'")
    assert "put the data at the same path on every node" in problem


def test_issue17_a_node_without_normlab_is_named_in_a_clear_error(cluster, tmp_path):
    # A node whose Python finds a normlab that cannot be imported, as on a machine without it.
    broken = tmp_path / "site" / "normlab"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'torch'\")\n")
    node = cluster.add_node("127.0.0.4", pythonpath=str(broken.parent))
    try:
        cluster.wait_for(3)
        with pytest.raises(ValueError, match=r"the Ray cluster cannot run normlab's jobs: 127.0.0.4: cannot import "
                                             r"normlab \(ModuleNotFoundError: No module named 'torch'\); install it "
                                             r"on every node"):
            Trainer(EXPERIMENT, small_config(), tmp_path / "run", progress=False,
                    executor=RayExecutor(cluster.address)).run()
    finally:
        cluster.stop_node(node)


def test_issue17_without_an_address_a_local_loopback_cluster_runs_the_jobs_and_is_stopped(cluster, local_rows,
                                                                                         tmp_path, monkeypatch):
    import psutil

    # As for a user who set nothing: the local cluster must not leave a Ray token in the home folder.
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    def started():  # live processes this test process started since ``before``
        alive = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if proc.pid not in before and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
            except psutil.NoSuchProcess:
                pass
        return alive

    ray.shutdown()  # this process's connection to the module's cluster: the executor must start its own
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        rows = Trainer(EXPERIMENT, small_config(), tmp_path / "run", progress=False,
                       executor=RayExecutor(local_cpus=1)).run()
        assert comparable(rows) == comparable(local_rows)
        log = (tmp_path / "run" / "log.txt").read_text()
        assert "4 jobs on a local Ray cluster: 127.0.0.2 (1 CPU)" in log
        assert not ray.is_initialized()
        assert not (tmp_path / "home" / ".ray").exists() and "RAY_AUTH_MODE" not in os.environ
        deadline = time.monotonic() + 30
        while started() and time.monotonic() < deadline:  # ray.init's gcs_server, raylet, ... are gone
            time.sleep(0.2)
        assert not started(), [p.name() for p in started()]
    finally:
        for proc in started():  # whatever is left, also when the test failed
            proc.kill()
        if not ray.is_initialized():
            cluster.connect()
