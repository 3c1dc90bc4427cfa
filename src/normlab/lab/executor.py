"""Executors: where the lab's jobs run. One interface, so that a cluster backend can be added
without touching experiments or the trainer.

An :class:`Executor` takes a list of :class:`~normlab.lab.trainer.Job` and runs them, calling
``done(job, rows)`` in the driving process as each one finishes (the driver writes the run
folders), and ``progress(steps)`` as they advance. It raises
:class:`~normlab.lab.trainer.Interrupted` when stopped by SIGINT/SIGTERM (after every running
job has checkpointed, so ``--resume`` continues) and :class:`JobFailed` when a job raised or its
worker died (after the other jobs have checkpointed and stopped; never a hang).

* :class:`InlineExecutor`: one job after another in this process (``--jobs 1``, and every
  data-parallel run under torchrun).
* :class:`ProcessExecutor`: ``N`` worker processes (``--jobs N``), started by "spawn", each
  training with one torch thread: torch's own threads collapse when processes share the cores.

Jobs seed everything they use, so the metrics do not depend on the executor or on the order in
which jobs finish, apart from wall time.
"""

from __future__ import annotations

import abc
import multiprocessing
import os
import queue as queue_module
import signal
import threading
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from .job import Interrupted, Job, RunPaths, run_job
from .runfiles import atomic_write_text

if TYPE_CHECKING:
    from .data import Dataset
    from .distributed import Team

__all__ = ["Executor", "InlineExecutor", "JobFailed", "ProcessExecutor", "default_jobs", "make_executor"]

Done = Callable[["Job", list], None]
Progress = Callable[[int], None]


class JobFailed(RuntimeError):
    """A job raised, or the process running it died. The message names the job and the error,
    and where its traceback was written."""


def default_jobs() -> int:
    """The number of cores this process may use (``--jobs``'s default)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def stop_on_signals(request_stop: Callable[[], None]) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into ``request_stop()``; a second one raises KeyboardInterrupt."""
    asked = {"stop": False}

    def handler(signum, frame):
        if asked["stop"]:
            raise KeyboardInterrupt
        asked["stop"] = True
        request_stop()

    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


def write_traceback(job: "Job", text: str) -> Path:
    """Write a failed job's traceback into its run folder's ``errors/``; return the path."""
    path = RunPaths(Path(job.run_dir)).error(job.key)
    atomic_write_text(path, f"{job.label}\n\n{text}")
    return path


def _failure(job: "Job", error: str, text: str) -> JobFailed:
    path = write_traceback(job, text)
    first = error.strip().splitlines()[0] if error.strip() else "unknown error"
    if len(first) > 300:
        first = first[:297] + "..."
    return JobFailed(f"job {job.label} failed: {first} (traceback: {path})")


class Executor(abc.ABC):
    """Runs jobs; see the module docstring."""

    @abc.abstractmethod
    def run(self, jobs: Sequence["Job"], *, done: Done, progress: Progress,
            data_of: Callable[["Job"], "Dataset | None"] = lambda job: None) -> None:
        """Run every job; ``done(job, rows)`` as each finishes. Raises Interrupted or JobFailed."""


class InlineExecutor(Executor):
    """Every job in this process, one after another (with one torch thread, like a worker)."""

    def __init__(self, team: "Team | None" = None):
        self.team = team

    def run(self, jobs, *, done, progress, data_of=lambda job: None) -> None:
        flag = {"stop": False}
        with stop_on_signals(lambda: flag.update(stop=True)):
            for job in jobs:
                try:
                    rows = run_job(job, data=data_of(job), stop=lambda: flag["stop"], progress=progress, team=self.team)
                except (Interrupted, KeyboardInterrupt):
                    raise
                except Exception as err:
                    raise _failure(job, f"{type(err).__name__}: {err}", traceback.format_exc()) from err
                done(job, rows)


# ----------------------------------------------------------------------------------------------
# Worker processes

_STOP: Any = None  # in a worker: the driver's stop event
_EVENTS: Any = None  # in a worker: the queue of (kind, job key, value) messages to the driver


def _init_worker(stop, events) -> None:
    global _STOP, _EVENTS
    _STOP, _EVENTS = stop, events
    # The driver decides when to stop (a terminal's Ctrl-C reaches the whole process group):
    # workers hear it through the stop event, checkpoint and return.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose driver was killed (SIGKILL, out of memory) would wait for work forever:
    leave as soon as the parent is gone. Its job keeps its last checkpoint for --resume."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


@dataclass
class _Outcome:
    status: str  # "done", "interrupted" or "failed"
    rows: list | None = None
    error: str = ""
    traceback: str = ""


def _work(job: "Job") -> _Outcome:
    _EVENTS.put(("start", job.key + "\0" + job.run_dir, os.getpid()))
    try:
        rows = run_job(job, stop=_STOP.is_set, progress=lambda n: _EVENTS.put(("steps", "", n)))
        return _Outcome("done", rows)
    except Interrupted:
        return _Outcome("interrupted")
    except BaseException as err:  # noqa: BLE001 - reported to the driver with its traceback
        return _Outcome("failed", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    finally:
        _EVENTS.put(("end", job.key + "\0" + job.run_dir, os.getpid()))


class ProcessExecutor(Executor):
    """``workers`` processes ("spawn"), each running one job at a time with one torch thread."""

    def __init__(self, workers: int):
        if workers < 1:
            raise ValueError(f"ProcessExecutor needs at least 1 worker, got {workers}.")
        self.workers = workers

    def run(self, jobs, *, done, progress, data_of=lambda job: None) -> None:
        if not jobs:
            return
        context = multiprocessing.get_context("spawn")
        stop, events = context.Event(), context.Queue()
        running: dict[str, "Job"] = {}
        by_id = {job.key + "\0" + job.run_dir: job for job in jobs}
        failure: JobFailed | None = None
        interrupted = False

        def drain() -> None:
            while True:
                try:
                    kind, job_id, value = events.get_nowait()
                except queue_module.Empty:
                    return
                if kind == "steps":
                    progress(value)
                elif kind == "start":
                    running[job_id] = by_id[job_id]
                else:
                    running.pop(job_id, None)

        pool = ProcessPoolExecutor(min(self.workers, len(jobs)), mp_context=context,
                                   initializer=_init_worker, initargs=(stop, events))
        try:
            with stop_on_signals(stop.set):
                futures = {pool.submit(_work, job): job for job in jobs}
                while futures:
                    finished, _ = wait(futures, timeout=0.2, return_when=FIRST_COMPLETED)
                    drain()
                    for future in finished:
                        job = futures.pop(future)
                        if future.cancelled():
                            continue
                        try:
                            outcome = future.result()
                        except BrokenProcessPool:
                            if failure is None:
                                lost = sorted(j.label for j in running.values()) or [job.label]
                                failure = JobFailed(
                                    f"a worker process died (killed, or out of memory) while running "
                                    f"{'; '.join(lost)}; finished jobs are kept: continue with --resume."
                                )
                            continue
                        if outcome.status == "done":
                            done(job, outcome.rows)
                        elif outcome.status == "interrupted":
                            interrupted = True
                        elif failure is None:
                            failure = _failure(job, outcome.error, outcome.traceback)
                    if (failure is not None or stop.is_set()) and not stop.is_set():
                        stop.set()  # the running jobs checkpoint and return
                    if stop.is_set():
                        for future in futures:
                            future.cancel()
                drain()
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():
                child.terminate()
            raise
        except BaseException:
            stop.set()  # e.g. the driver could not write a result: running jobs checkpoint and return
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            events.close()
        if failure is not None:
            raise failure
        if interrupted or stop.is_set():
            raise Interrupted("stopped; every finished job is kept and running ones checkpointed")


def make_executor(jobs: int, *, team: "Team | None" = None) -> Executor:
    """``--jobs``: 1 runs in this process, more in worker processes."""
    if jobs <= 1 or (team is not None and team.active):
        return InlineExecutor(team)
    return ProcessExecutor(jobs)
