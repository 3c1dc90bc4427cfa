"""The lab's runs: every (arm, grid point, seed) of an experiment, each a job
(:mod:`normlab.lab.job`: seeded, one torch thread, one row per evaluation, checkpointed and
resumable), so a resumed run ends with the same metrics as an uninterrupted one. The run folder's ``metrics.jsonl`` holds the
rows of finished jobs, in job order; ``jobs/KEY.jsonl`` marks a finished job, which a resumed run
never redoes. Jobs run one after another in this process, or in parallel worker processes
(:mod:`normlab.lab.executor`), with the same metrics apart from wall time.

>>> from normlab.lab.config import ExperimentConfig
>>> # Trainer(experiment, config, "runs/demo", jobs=2).run() -> list of metrics rows
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

from .augment import check_augment
from .checkpoint import load_job_checkpoint
from .config import (ConfigError, ExperimentConfig, arm_config, check_values, config_from_dict, config_to_dict,
                     grid_points, save_config)
from .data import Dataset
from .distributed import Team, join
from .executor import Executor, make_executor
from .experiments.base import Experiment
from .job import (BatchSampler, Interrupted, Job, RunPaths, check_optimizer, dataset_for, job_key,  # noqa: F401
                  make_optimizer, resolve_device, run_job)  # some re-exported: the trainer is where users look for them
from .models import check_model_config
from .runfiles import append_jsonl, make_folder, read_jsonl, write_jsonl

__all__ = ["Interrupted", "Job", "RunPaths", "Trainer", "BatchSampler", "execute", "plan_jobs", "resolve_device",
           "run_job", "unfinished_jobs"]


def plan_jobs(config: ExperimentConfig, run_dir: str | Path) -> list[Job]:
    """Every job of a run of ``config`` in ``run_dir``: seeds, then grid points, then arms."""
    as_dict = config_to_dict(config)
    t = config.train
    return [
        Job(config.experiment, str(run_dir), as_dict, arm, seed, tuple(point.items()))
        for seed in range(t.first_seed, t.first_seed + t.seeds)
        for point in grid_points(config)
        for arm in config.arms
    ]


def unfinished_jobs(run_dir: str | Path) -> list[Job]:
    """The jobs of the run in ``run_dir`` (from its ``config.json``) that have not finished."""
    paths = RunPaths(Path(run_dir))
    config = config_from_dict(json.loads(paths.config.read_text(encoding="utf-8")))
    return [job for job in plan_jobs(config, run_dir) if not paths.finished(job.key).exists()]


class Trainer:
    """Runs one experiment's jobs into a run folder.

    Args:
        experiment: the experiment (its probes are recorded at every evaluation).
        config: the resolved config.
        run_dir: the run folder (created).
        resume: continue a stopped run in ``run_dir``; its ``config.json`` must equal ``config``.
        progress: show progress on stderr: a bar with ETA on a terminal, a plain line every 5% elsewhere.
        data: a loaded data set (else loaded from ``config.data``; worker processes load their own).
        jobs: worker processes (1: every job in this process, one after another).
        executor: where the jobs run instead (e.g. a :class:`~normlab.lab.ray_executor.RayExecutor`).

    Raises:
        ConfigError: a bad config (checked for every arm and grid point before anything trains).
    """

    def __init__(
        self,
        experiment: Experiment,
        config: ExperimentConfig,
        run_dir: str | Path,
        *,
        resume: bool = False,
        progress: bool = True,
        data: Dataset | None = None,
        jobs: int = 1,
        executor: Executor | None = None,
    ):
        self.experiment, self.config = experiment, config
        self.paths = RunPaths(Path(run_dir))
        self.resume, self.progress, self.workers, self.executor = resume, progress, jobs, executor
        self.device = resolve_device(config.train.device)
        self.team: Team = join(self.device)
        configs = self._check_config()
        self.data = data or dataset_for(config, self.device)
        for cfg in configs:
            if cfg.train.batch_size > len(self.data.y_train):
                raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(self.data.y_train)} "
                                  f"training samples of {cfg.data.name}; lower it.")
        # The folder last: everything that can refuse the run does so before it is written in,
        # so that the corrected command can use the same --out.
        problem = None
        if self.team.main:
            try:
                self._check_folder(read_checkpoints=resume)
            except ValueError as err:
                problem = str(err)
        problem = self.team.share(problem)  # every process stops on rank 0's error, none waits
        if problem:
            raise ConfigError(problem)

    def _check_config(self) -> list[ExperimentConfig]:
        """Check the run's options and the config of every arm at every grid point; return those configs."""
        t = self.config.train
        for key in ("steps", "batch_size", "seeds", "eval_every", "checkpoint_every"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"train.{key} must be a positive int, got {getattr(t, key)!r}.")
        if t.first_seed < 0:
            raise ConfigError(f"train.first_seed must be >= 0, got {t.first_seed!r}.")
        if not self.config.arms:
            raise ConfigError("the experiment has no arms to train; give at least one in config.arms.")
        if self.workers < 1:
            raise ConfigError(f"--jobs must be at least 1, got {self.workers}.")
        if self.team.active and self.workers > 1:
            raise ConfigError(f"--jobs {self.workers} with --nproc: a data-parallel run trains its jobs one after "
                              "another in every process; drop --jobs (or --nproc).")
        # What every job trains with, the experiment's derived settings included, so that a bad
        # combination fails here, before the run folder exists.
        configs = [self.experiment.job_config(arm_config(self.config, arm, point))
                   for point in grid_points(self.config) for arm in self.config.arms]
        for cfg in configs:
            check_values(cfg)
            self.experiment.check_params(cfg.params)
            check_model_config(cfg.model)
            check_augment(cfg.data)
            check_optimizer(cfg)
            resolve_device(cfg.train.device)
            if cfg.train.batch_size % self.team.world:
                raise ConfigError(
                    f"train.batch_size={cfg.train.batch_size} must split evenly over the {self.team.world} "
                    f"processes (each takes an equal slice of the global batch); choose a multiple of "
                    f"{self.team.world}."
                )
        return configs

    def jobs(self) -> list[Job]:
        """Every job of the run, in the order their rows appear in ``metrics.jsonl``."""
        return plan_jobs(self.config, self.paths.root)

    # -- the folder ------------------------------------------------------------------------
    def prepare(self) -> list[Job]:
        """Create (or check, when resuming) the folder; return the jobs not yet finished."""
        problem = None
        if self.team.main:
            try:
                self._prepare_folder()
            except ConfigError as err:
                problem = str(err)
        problem = self.team.share(problem)  # every process stops on rank 0's error, none waits
        if problem:
            raise ConfigError(problem)
        finished = self.team.share([job.key for job in self.jobs() if self.paths.finished(job.key).exists()])
        if self.team.main:
            self._write_metrics()
        return [job for job in self.jobs() if job.key not in finished]

    def _prepare_folder(self) -> None:
        self._check_folder()
        if not self.paths.config.exists():
            save_config(self.config, self.paths.config)

    def _check_folder(self, read_checkpoints: bool = False) -> None:
        """Create the run folder, or check the run it holds against this one (and, with
        ``read_checkpoints``, that every unfinished job's checkpoint can be resumed from)."""
        try:
            make_folder(self.paths.root)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        saved = self.paths.config
        if saved.exists():
            if not self.resume:
                raise ConfigError(
                    f"the run folder {str(self.paths.root)!r} already holds a run; continue it with "
                    f"--resume or choose another --out."
                )
            old, new = json.loads(saved.read_text()), config_to_dict(self.config)
            old["train"].pop("device", None), new["train"].pop("device", None)
            if old != new:
                diff = _diff_keys(old, new)
                raise ConfigError(
                    f"--resume: the run in {str(self.paths.root)!r} was made with a different config "
                    f"(differs in {', '.join(diff)}); resume with the same options or start a new --out."
                )
        if read_checkpoints:  # a damaged one would fail its job mid-run; say so now, in one line
            for job in self.jobs():
                if not self.paths.finished(job.key).exists() and self.paths.checkpoint(job.key).exists():
                    load_job_checkpoint(self.paths.checkpoint(job.key))

    def finish_job(self, job: Job, rows: list[dict[str, Any]]) -> None:
        """Record a finished job: its rows file, then its rows appended to the metrics."""
        if self.team.main:
            write_jsonl(self.paths.finished(job.key), rows)
            append_jsonl(self.paths.metrics, rows)

    def _write_metrics(self) -> None:
        """Rewrite ``metrics.jsonl`` from the finished jobs, in job order (whatever order they finished in)."""
        rows = []
        for job in self.jobs():
            if self.paths.finished(job.key).exists():
                rows += read_jsonl(self.paths.finished(job.key))
        write_jsonl(self.paths.metrics, rows)

    def rows(self) -> list[dict[str, Any]]:
        return read_jsonl(self.paths.metrics) if self.team.main else []

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Train every job not already finished; return all metrics rows.

        Raises:
            Interrupted: stopped by a signal; every finished job is kept and ``resume`` continues.
            JobFailed: a job raised (its traceback is in ``errors/``) or its worker died.
        """
        execute([self], jobs=self.workers, progress=self.progress, executor=self.executor)
        return self.rows()


def execute(runs: Sequence[Trainer], *, jobs: int = 1, progress: bool = True,
            finished: Callable[[Trainer], None] = lambda run: None, executor: Executor | None = None) -> None:
    """Run the unfinished jobs of several runs through one executor (``executor``, else ``jobs``
    worker processes, or this process for 1) and write each finished job into its run folder as it ends;
    ``finished(run)`` is called when a run's last job is done. Metrics files are left in job
    order even when the run stops early."""

    pending = [(run, job) for run in runs for job in run.prepare()]
    owner = {(job.run_dir, job.key): run for run, job in pending}
    left = {id(run): sum(1 for r, _ in pending if r is run) for run in runs}
    main = all(run.team.main for run in runs)
    total = sum(job.steps for _, job in pending)
    team = runs[0].team if runs else Team()

    def done(job: Job, rows: list[dict[str, Any]]) -> None:
        run = owner[(job.run_dir, job.key)]
        run.finish_job(job, rows)
        left[id(run)] -= 1
        if not left[id(run)] and run.team.main:
            run._write_metrics()
            finished(run)

    for run in runs:
        if not left[id(run)] and run.team.main:
            finished(run)
    try:
        with _progress_bar(total, progress and main) as bar:
            (executor or make_executor(jobs, team=team)).run(
                [job for _, job in pending], done=done, progress=bar.update,
                data_of=lambda job: owner[(job.run_dir, job.key)].data,
            )
    finally:
        for run in runs:
            if run.team.main:
                run._write_metrics()


def _progress_bar(total: int, enabled: bool):
    from .progress import progress_display

    return progress_display(total, enabled=enabled)  # a bar on a terminal, plain lines in a log


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
