"""The Ray executor: every job of a run or suite is a Ray task on a cluster (``--executor ray``).

Where results go: the driver writes them. A task trains its job in a scratch folder on its
node, starting from the run folder's checkpoint of that job (sent with the task), and returns
its rows and its last checkpoint; the driver writes both into the run folder, exactly where a
local run puts them. So the nodes need no shared disk, a run folder is the same whichever
executor filled it (metrics equal apart from wall time), and ``--resume`` continues on Ray or
locally.

* Worker or node death: Ray runs the task again (``max_retries``), from the checkpoint the
  driver sent; every retry is counted in the run folder's ``log.txt``. A job that raises fails
  the run (:class:`~normlab.lab.executor.JobFailed`, traceback in ``errors/``) after the other
  running jobs have checkpointed.
* Ctrl-C / SIGTERM: queued tasks are cancelled, running ones checkpoint and return, their
  checkpoints are written, and :class:`~normlab.lab.job.Interrupted` is raised (a second
  Ctrl-C cancels the running tasks at once).
* Code and data: normlab is not shipped to the nodes; each node must have the driver's normlab
  installed and the run's data at the same path. Every node that could take a job is checked
  first (:func:`normlab.lab._ray_remote.probe_node`): a missing or different normlab, or unreadable data,
  stops the run with an error naming the node and what is missing.

Without an address a local cluster is started on this machine, listening on the loopback
address 127.0.0.2 (Ray would turn 127.0.0.1 into the network interface's address), and stopped
at the end; ``address="auto"`` joins the cluster that ``ray start`` started on this machine.

>>> RayExecutor(job_cpus=0)
Traceback (most recent call last):
...
ValueError: --job-cpus must be a positive number of CPUs per job, got 0; give 1 (the default) or more.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .executor import Executor, JobFailed, _failure, stop_on_signals
from .job import Interrupted, Job, RunPaths, run_job
from .runfiles import atomic_write_bytes

__all__ = ["LOCAL_NODE_IP", "RayExecutor", "import_ray"]

LOCAL_NODE_IP = "127.0.0.2"  # a loopback address that Ray does not replace by the interface's
_POLL_S = 0.5  # how often tasks and the driver look at the board


def import_ray():
    """The ``ray`` module, or a ``ValueError`` that says how to install it."""
    try:
        import ray
    except ImportError as err:
        raise ValueError(f"--executor ray needs Ray, an optional extra of normlab ({err}): "
                         f"pip install 'normlab[ray]'") from None
    return ray


class _Watcher:
    """In a task: a thread that tells the board the job's steps and reads its stop flag, so the
    training loop polls a local event instead of the network."""

    def __init__(self, board, key: str, stopped: bool):
        self.board, self.key, self.steps = board, key, 0
        self.stop, self.closed = threading.Event(), threading.Event()
        if stopped:
            self.stop.set()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def add(self, steps: int) -> None:
        self.steps += steps

    def _loop(self) -> None:
        import ray

        while not self.closed.wait(_POLL_S):
            try:
                if ray.get(self.board.report.remote(self.key, self.steps)):
                    self.stop.set()
            except Exception:  # noqa: BLE001 - the driver is gone: stop and checkpoint
                self.stop.set()

    def close(self) -> None:
        self.closed.set()
        self.thread.join()


def _train(job: Job, checkpoint: bytes | None, board, key: str) -> dict[str, Any]:
    """The Ray task: one job in a scratch folder, from ``checkpoint``; returns its outcome."""
    import ray

    attempt, stopped = ray.get(board.begin.remote(key))
    with tempfile.TemporaryDirectory(prefix="normlab-ray-") as scratch:
        paths = RunPaths(Path(scratch))
        if checkpoint is not None:
            atomic_write_bytes(paths.checkpoint(job.key), checkpoint)
        watcher = _Watcher(board, key, stopped)
        outcome: dict[str, Any] = {"attempt": attempt, "node": ray.util.get_node_ip_address(), "pid": os.getpid()}
        try:
            outcome["rows"] = run_job(dataclasses.replace(job, run_dir=scratch), stop=watcher.stop.is_set,
                                      progress=watcher.add)
            outcome["status"] = "done"
        except Interrupted:
            outcome["status"] = "interrupted"
        except Exception as err:  # noqa: BLE001 - sent to the driver with its traceback
            # Paths in the scratch folder are named as the run folder's, where the user looks.
            return {**outcome, "status": "failed", "error": f"{type(err).__name__}: {err}".replace(scratch, job.run_dir),
                    "traceback": traceback.format_exc().replace(scratch, job.run_dir)}
        finally:
            watcher.close()
        saved = paths.checkpoint(job.key)
        outcome["checkpoint"] = saved.read_bytes() if saved.exists() else None
        return outcome


def log_line(run_dir: str | Path, line: str) -> None:
    """Append a timestamped line to a run folder's ``log.txt``."""
    path = RunPaths(Path(run_dir)).log
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")


class RayExecutor(Executor):
    """Runs every job as a Ray task; see the module docstring.

    Args:
        address: the cluster (``"auto"``: the one started on this machine by ``ray start``;
            ``"HOST:PORT"``: its head); ``None`` starts a local cluster for the run. A
            connection this process already holds (``ray.init`` done) is used as it is.
        job_cpus: CPUs each task reserves (``--job-cpus``).
        job_gpus: GPUs each task reserves (``--job-gpus``).
        local_cpus: CPUs of the local cluster started without ``address`` (default: all).
        max_retries: runs of a task again after its worker or node died.

    Raises:
        ValueError: non-positive ``job_cpus``, negative ``job_gpus`` or ``max_retries``.
    """

    def __init__(self, address: str | None = None, *, job_cpus: float = 1, job_gpus: float = 0,
                 local_cpus: int | None = None, max_retries: int = 3):
        if isinstance(job_cpus, bool) or not isinstance(job_cpus, (int, float)) or not job_cpus > 0:
            raise ValueError(f"--job-cpus must be a positive number of CPUs per job, got {job_cpus!r}; give 1 "
                             f"(the default) or more.")
        if isinstance(job_gpus, bool) or not isinstance(job_gpus, (int, float)) or not job_gpus >= 0:
            raise ValueError(f"--job-gpus must be a number of GPUs per job >= 0, got {job_gpus!r}; give 0 "
                             f"(the default) for CPU jobs.")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}.")
        self.address, self.job_cpus, self.job_gpus = address, job_cpus, job_gpus
        self.local_cpus, self.max_retries = local_cpus, max_retries
        self.retries = 0  # of the last run, for callers and tests
        self._board_of: tuple[str, Any] | None = None  # (Ray job id, board actor)

    def __str__(self) -> str:
        where = f"the cluster at {self.address}" if self.address else "a local cluster"
        return f"Ray tasks on {where} ({self.job_cpus:g} CPU, {self.job_gpus:g} GPU each)"

    def run(self, jobs, *, done, progress, data_of=lambda job: None) -> None:
        if not jobs:
            return
        ray = import_ray()
        with self._connected(ray) as where:
            nodes = _check_nodes(ray, jobs, self.job_cpus, self.job_gpus)
            for run_dir in dict.fromkeys(job.run_dir for job in jobs):
                log_line(run_dir, f"ray: {sum(j.run_dir == run_dir for j in jobs)} jobs on {where}: "
                                  f"{', '.join(nodes)}; {self.job_cpus:g} CPU, {self.job_gpus:g} GPU per job")
            self._run(ray, jobs, done, progress)

    @contextmanager
    def _connected(self, ray) -> Iterator[str]:
        if ray.is_initialized():
            yield f"the Ray cluster at {ray.get_runtime_context().gcs_address}"
            return
        try:
            if self.address is None:
                from .executor import default_jobs

                with _local_auth():
                    ray.init(num_cpus=self.local_cpus or default_jobs(), _node_ip_address=LOCAL_NODE_IP,
                             include_dashboard=False, logging_level="ERROR", configure_logging=True)
            else:
                ray.init(address=self.address, logging_level="ERROR")
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = (str(err).strip().splitlines() or [""])[0][:300]
            if self.address is None:
                raise ValueError(f"could not start a local Ray cluster ({type(err).__name__}: {first}).") from None
            raise ValueError(
                f"could not join the Ray cluster at --address {self.address} ({type(err).__name__}: {first}); "
                f"start one first (ray start --head ..., see the README's 'Running the suite on a cluster') or "
                f"leave out --address to run on a local one.") from None
        try:
            where = "a local Ray cluster" if self.address is None else f"the Ray cluster at {self.address}"
            yield where
        finally:
            ray.shutdown()  # a local cluster stops with it; a joined one only loses this driver

    def _run(self, ray, jobs, done, progress) -> None:
        board = self._board(ray)
        task = ray.remote(_train).options(num_cpus=self.job_cpus, num_gpus=self.job_gpus,
                                          max_retries=self.max_retries, retry_exceptions=False)
        refs: dict[Any, Job] = {}
        for job in jobs:
            saved = RunPaths(Path(job.run_dir)).checkpoint(job.key)
            refs[task.remote(job, saved.read_bytes() if saved.exists() else None, board, _key(job))] = job
        asked = {"stop": False}
        stopping, interrupted, failure = False, False, None
        shown, self.retries = 0, 0
        try:
            with stop_on_signals(lambda: asked.update(stop=True)):
                while refs:
                    ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=_POLL_S)
                    steps, started = ray.get(board.state.remote())
                    if steps > shown:
                        progress(steps - shown)
                        shown = steps
                    for ref in ready:
                        job = refs.pop(ref)
                        outcome = self._outcome(ray, ref, job)
                        if outcome["status"] == "done":
                            _write_checkpoint(job, outcome["checkpoint"])
                            done(job, outcome["rows"])
                        elif outcome["status"] == "interrupted":
                            _write_checkpoint(job, outcome.get("checkpoint"))
                            interrupted = True
                        elif failure is None:
                            failure = outcome["failure"]
                    if (asked["stop"] or failure is not None) and not stopping:
                        stopping = True
                        ray.get(board.request_stop.remote())  # running tasks checkpoint and return
                        begun = set(started)
                        for ref, job in refs.items():
                            if _key(job) not in begun:
                                ray.cancel(ref)
        except BaseException:  # a second Ctrl-C, or the driver could not write a result: stop at once
            for ref in refs:
                ray.cancel(ref, force=True)
            raise
        if failure is not None:
            raise failure
        if interrupted or stopping:
            raise Interrupted("stopped; every finished job is kept and running ones checkpointed")

    def _board(self, ray):
        """The board actor: kept for the next run on the same connection (its process takes seconds
        to start), reset for this one."""
        from . import _ray_remote

        job_id = ray.get_runtime_context().get_job_id()
        if self._board_of is not None and self._board_of[0] == job_id:
            board = self._board_of[1]
            ray.get(board.reset.remote())
            return board
        _ship_by_value(ray)
        board = ray.remote(num_cpus=0, max_restarts=0)(_ray_remote.Board).remote()
        self._board_of = (job_id, board)
        return board

    def _outcome(self, ray, ref, job: Job) -> dict[str, Any]:
        """A task's outcome; its retries logged; a lost task as ``{"status": "failed", "failure"}``."""
        from ray.exceptions import RayTaskError, TaskCancelledError

        try:
            outcome = ray.get(ref)
        except TaskCancelledError:
            return {"status": "interrupted"}
        except RayTaskError as err:  # raised outside the job: e.g. normlab could not be unpickled
            return {"status": "failed", "failure": _failure(job, str(err).strip().splitlines()[-1], str(err))}
        except ray.exceptions.RayError as err:  # the worker or node died more than max_retries times
            first = (str(err).strip().splitlines() or [""])[0][:300]
            log_line(job.run_dir, f"ray: job {job.key} lost: its worker died {self.max_retries + 1} times "
                                  f"({type(err).__name__})")
            return {"status": "failed", "failure": JobFailed(
                f"job {job.label} failed: its Ray worker died {self.max_retries + 1} times ({type(err).__name__}: "
                f"{first}); finished jobs are kept: continue with --resume.")}
        if outcome["attempt"] > 1:
            self.retries += outcome["attempt"] - 1
            log_line(job.run_dir, f"ray: job {job.key} retried {outcome['attempt'] - 1} time(s) after its worker "
                                  f"or node died; attempt {outcome['attempt']} ran on {outcome['node']}")
        if outcome["status"] == "done":
            log_line(job.run_dir, f"ray: job {job.key} ran on {outcome['node']}")
        if outcome["status"] == "failed":
            outcome["failure"] = _failure(job, outcome["error"], outcome["traceback"])
        return outcome


@contextmanager
def _local_auth() -> Iterator[None]:
    """Ray 2.60 turns token authentication on for a cluster that ``ray.init()`` starts and writes
    a token to ``~/.ray/auth_token``, whose presence then turns it on for every later ``ray start``
    of the user, and drivers joining those fail ("Missing authorization header"). normlab's
    run-long local cluster, on a loopback address, goes without, unless ``RAY_AUTH_MODE`` says
    otherwise; its processes keep the setting they started with."""
    if "RAY_AUTH_MODE" in os.environ:
        yield
        return
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        yield
    finally:
        os.environ.pop("RAY_AUTH_MODE", None)


def _key(job: Job) -> str:
    return f"{job.run_dir}\0{job.key}"


def _write_checkpoint(job: Job, data: bytes | None) -> None:
    if data is not None:
        atomic_write_bytes(RunPaths(Path(job.run_dir)).checkpoint(job.key), data)


def _ship_by_value(ray) -> None:
    """Send :mod:`._ray_remote`'s code with its tasks and actors, not its module name."""
    from . import _ray_remote

    ray.cloudpickle.register_pickle_by_value(_ray_remote)


def _check_nodes(ray, jobs, job_cpus: float, job_gpus: float) -> list[str]:
    """Probe every node that can take a job; return ``["ADDRESS (N CPU)", ...]`` or raise ValueError."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from . import _ray_remote

    alive = [n for n in ray.nodes() if n.get("Alive")]
    fit = [n for n in alive if n["Resources"].get("CPU", 0) >= job_cpus and n["Resources"].get("GPU", 0) >= job_gpus]
    if not fit:
        sizes = ", ".join(f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU, "
                          f"{n['Resources'].get('GPU', 0):g} GPU)" for n in alive) or "none alive"
        raise ValueError(f"no node of the Ray cluster has the {job_cpus:g} CPU and {job_gpus:g} GPU a job asks for "
                         f"(nodes: {sizes}); lower --job-cpus/--job-gpus or add bigger nodes.")
    import normlab

    _ship_by_value(ray)  # on a node without normlab the probe still runs, to say so
    samples = {}
    for job in jobs:
        cfg = job.train_config()
        samples.setdefault((repr(cfg.data), cfg.train.device), (job.experiment, job.config, job.arm, job.seed, job.point))
    digest = _ray_remote.code_digest(Path(normlab.__file__).parent)
    probe = ray.remote(_ray_remote.probe_node)
    refs = [probe.options(num_cpus=job_cpus, num_gpus=job_gpus, max_retries=0,
                          scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(digest, list(samples.values())) for n in fit]
    problems = []
    for node, ref in zip(fit, refs):
        try:
            report = ray.get(ref)
        except ray.exceptions.RayError as err:
            first = (str(err).strip().splitlines() or [""])[-1][:300]
            problems.append(f"{node['NodeManagerAddress']}: the check could not run ({type(err).__name__}: {first})")
            continue
        problems += [f"{node['NodeManagerAddress']}: {p}" for p in report["problems"]]
    if problems:
        raise ValueError("the Ray cluster cannot run normlab's jobs: " + "; ".join(problems) +
                         " (README: 'Running the suite on a cluster').")
    return [f"{n['NodeManagerAddress']} ({n['Resources'].get('CPU', 0):g} CPU)" for n in fit]
