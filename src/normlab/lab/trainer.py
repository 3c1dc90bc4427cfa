"""The lab's training: one seeded, checkpointed, resumable job, and the runs made of them.

A run trains every (arm, grid point, seed) of an experiment. Each is a :class:`Job`: its model
is initialized from the seed (arms and grid points of one seed share their initial weights, as
far as the model shapes agree, and their batches), it trains with one torch thread, and it
gives one row per evaluation::

    {"step", "arm", "seed", ["point",] "train_loss", "train_loss_sd", "test_loss", "test_acc",
     "wall_time", "probes": {...}[, "diverged": true]}

``point`` (the grid point, ``{axis: value}``) is there only when the experiment has a grid.
``train_loss`` is the mean loss of the steps since the last evaluation and ``train_loss_sd``
their standard deviation (step-to-step variation); ``wall_time`` counts training seconds only.
A job whose loss becomes NaN or infinite stops there: its last row says ``"diverged": true``.

A job checkpoints its whole state (model, optimizer, batch order, random state, partial loss
sums, its rows so far) every ``checkpoint_every`` steps and when it is stopped, so a resumed run
ends with the same metrics as an uninterrupted one. The run folder's ``metrics.jsonl`` holds the
rows of finished jobs, in job order; ``jobs/KEY.jsonl`` marks a finished job, which a resumed run
never redoes. Jobs run one after another in this process, or in parallel worker processes
(:mod:`normlab.lab.executor`), with the same metrics apart from wall time.

>>> from normlab.lab.config import ExperimentConfig
>>> # Trainer(experiment, config, "runs/demo", jobs=2).run() -> list of metrics rows
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import (ConfigError, ExperimentConfig, arm_config, config_from_dict, config_to_dict, grid_points,
                     point_config, save_config)
from .data import Dataset, load_dataset
from .distributed import Team, join
from .experiments.base import Experiment, get_experiment
from .models import build_model, check_model_config
from .runfiles import append_jsonl, atomic_write_bytes, read_jsonl, write_jsonl

__all__ = ["Interrupted", "Job", "RunPaths", "Trainer", "BatchSampler", "execute", "plan_jobs", "resolve_device",
           "run_job", "unfinished_jobs"]


class Interrupted(Exception):
    """The run was stopped (Ctrl-C or SIGTERM) after checkpointing; ``resume`` continues it."""


@dataclass(frozen=True)
class RunPaths:
    """The files of one run folder."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def checkpoint(self, key: str) -> Path:
        return self.root / "checkpoints" / f"{key}.pt"

    def finished(self, key: str) -> Path:
        return self.root / "jobs" / f"{key}.jsonl"

    def error(self, key: str) -> Path:
        return self.root / "errors" / f"{key}.txt"


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def job_key(arm: str, point: dict[str, Any], seed: int) -> str:
    """A job's file-safe name: ``ARM-seedN``, with the grid point between (``batch-lr=0.1-seed0``).

    >>> job_key("batch", {"train.lr": 0.1, "model.activation": "relu"}, 2)
    'batch-lr=0.1-activation=relu-seed2'
    """
    parts = [arm, *(f"{axis.rsplit('.', 1)[-1]}={_format_value(v)}" for axis, v in point.items()), f"seed{seed}"]
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", "-".join(parts))


@dataclass(frozen=True)
class Job:
    """One arm of one experiment at one grid point and seed: what a worker needs, picklable.

    Attributes:
        experiment: the experiment's registry name (its probes are recorded).
        run_dir: the run folder (checkpoints are written under it).
        config: the run's resolved config as a dict (:func:`config_to_dict`).
        arm: the arm.
        seed: the seed.
        point: the grid point as ``((axis, value), ...)`` (empty without a grid).
    """

    experiment: str
    run_dir: str
    config: dict[str, Any]
    arm: str
    seed: int
    point: tuple[tuple[str, Any], ...] = ()

    @property
    def key(self) -> str:
        return job_key(self.arm, dict(self.point), self.seed)

    @property
    def label(self) -> str:
        where = "".join(f", {axis}={_format_value(v)}" for axis, v in self.point)
        return f"{self.experiment}: arm {self.arm!r}{where}, seed {self.seed}"

    @property
    def steps(self) -> int:
        return int(self.train_config().train.steps)

    def train_config(self) -> ExperimentConfig:
        """The config this job trains with (base, grid point, arm, then the experiment's
        :meth:`~normlab.lab.experiments.base.Experiment.job_config`; no grid)."""
        config = arm_config(config_from_dict(self.config), self.arm, dict(self.point))
        return get_experiment(self.experiment).job_config(config)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when available, else cpu; ``"cuda"`` without a GPU is an error. Under
    torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and "LOCAL_RANK" in os.environ and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto.")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {name!r}.")
    return torch.device(name)


class BatchSampler:
    """Epochs of shuffled indices cut into full batches (a short last batch is dropped).

    Its whole state (generator, current permutation, position) goes into checkpoints, so the
    batch order after a resume is the one an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise ConfigError(f"train.batch_size={batch_size} exceeds the {n} training samples; lower it.")
        self.n, self.batch_size = n, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(n, generator=self.generator)
        self.pos = 0

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "perm": self.perm, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.perm, self.pos = state["perm"], state["pos"]


def make_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with optional momentum) or Adam, with the config's learning rate and weight decay."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ConfigError(f"train.optimizer must be 'sgd' or 'adam', got {config.optimizer!r}.")


# ----------------------------------------------------------------------------------------------
# One job


_DATA: dict[tuple, Dataset] = {}  # per process: a worker loads each data set once


def dataset_for(config: ExperimentConfig, device: torch.device) -> Dataset:
    """The data set a config trains on, on ``device``, loaded once per process."""
    d = config.data
    key = (d.name, d.data_dir, d.test_fraction, d.split_seed, d.limit, str(device))
    if key not in _DATA:
        _DATA[key] = load_dataset(d.name, data_dir=d.data_dir, test_fraction=d.test_fraction,
                                  split_seed=d.split_seed, limit=d.limit).to(device)
    return _DATA[key]


@contextmanager
def one_thread() -> Iterator[None]:
    """One torch thread while a job trains: jobs run side by side in processes, and torch's own
    threads collapse when the cores are shared. Also makes a job's numbers independent of the
    machine's core count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_job(
    job: Job,
    *,
    data: Dataset | None = None,
    stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] = lambda steps: None,
    team: Team | None = None,
) -> list[dict[str, Any]]:
    """Train one job to its end and return its metrics rows (rank 0's; ``[]`` on other ranks).

    Continues from the job's checkpoint when there is one. ``stop()`` is polled after every
    step: when true, the job checkpoints and raises :class:`Interrupted`. ``progress(n)`` is
    told of every ``n`` steps done. ``team`` is the data-parallel team (default: this process).
    """
    cfg = job.train_config()
    experiment = get_experiment(job.experiment)
    device = resolve_device(cfg.train.device)
    team = team or Team()
    data = data if data is not None else dataset_for(cfg, device)
    paths = RunPaths(Path(job.run_dir))
    ckpt_path = paths.checkpoint(job.key)
    state = _load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    steps, every = cfg.train.steps, cfg.train.eval_every
    if state is not None and (state["step"] >= steps or state.get("diverged")):
        progress(steps)
        return list(state["rows"])
    if stop():
        raise Interrupted(f"stopped before {job.label}")
    if type(experiment).custom_job is not Experiment.custom_job:
        with one_thread():
            custom = experiment.custom_job(job, data)
        if custom is not None:
            progress(steps)
            return custom

    with one_thread():
        torch.manual_seed(job.seed)
        model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        if team.active and cfg.train.sync_bn:
            from ..surgery.sync import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)  # a deep copy: model.blocks follows it
        optimizer = make_optimizer(cfg.train, model)
        sampler = BatchSampler(len(data.y_train), cfg.train.batch_size, job.seed)
        # The losses since the last evaluation stay on the device (no host sync per step).
        window: list[torch.Tensor] = []
        step, wall, rows = 0, 0.0, []
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            if device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], device)
            window = list(state["window"].to(device).unbind())
            step, wall, rows = state["step"], state["wall_time"], list(state["rows"])
            progress(step)
        # Every process trains its slice of each global batch through DDP, which averages the
        # gradients; rank 0 alone evaluates, on the unwrapped model.
        trained = model
        if team.active:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        probes = [probe.attach(model) for probe in experiment.probes(cfg, job.arm)]

        def measure() -> dict[str, float]:
            return experiment.measurements(model, data, cfg, job.arm)

        def evaluate(train_loss, train_sd, diverged=False):
            if team.main:
                rows.append(_evaluate(model, data, probes, job, step, train_loss, train_sd, wall, diverged, measure))

        def save(diverged=False):
            if team.main:
                _save(ckpt_path, job, model, optimizer, sampler, window, step, wall, rows, diverged, device)
            team.barrier()  # the checkpoint is on disk before anyone may resume from it

        try:
            if state is None:
                evaluate(None, None)
            x_train, y_train = data.x_train, data.y_train
            model.train()
            started, done_since = time.perf_counter(), 0
            while step < steps:
                idx = sampler.next()  # CPU indices also index tensors on an accelerator
                if team.active:
                    idx = idx.view(team.world, -1)[team.rank]
                loss = F.cross_entropy(trained(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                window.append(loss.detach())
                step += 1
                done_since += 1
                if step % every == 0 or step == steps:
                    wall += time.perf_counter() - started
                    losses = torch.stack(window).double()
                    sd = losses.std() if len(window) > 1 else torch.zeros((), dtype=losses.dtype, device=device)
                    mean, sd = team.mean(torch.stack([losses.mean(), sd])).tolist()
                    window = []
                    diverged = not math.isfinite(mean)
                    evaluate(_finite(mean), _finite(sd) if not diverged else None, diverged)
                    model.train()
                    progress(done_since)
                    done_since = 0
                    if diverged:  # nothing more to learn from a NaN network
                        progress(steps - step)
                        save(diverged=True)
                        break
                    started = time.perf_counter()
                # All processes stop at the same step, or the others would wait in a collective.
                stopping = team.any(stop())
                if step % cfg.train.checkpoint_every == 0 or step == steps or stopping:
                    wall += time.perf_counter() - started
                    save()
                    started = time.perf_counter()
                if stopping:
                    raise Interrupted(f"stopped at step {step} of {job.label}; checkpoint saved")
        finally:
            for _, remove in probes:
                remove()
    return rows


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        first = (str(err).strip().splitlines() or [""])[0][:120]
        raise ValueError(f"cannot read the job's checkpoint {path}: delete it to train this job again from the "
                         f"start ({type(err).__name__}: {first})") from err


@torch.no_grad()
def _evaluate(model, data, probes, job: Job, step, train_loss, train_sd, wall, diverged,
              measure: Callable[[], dict[str, float]] = dict) -> dict[str, Any]:
    model.eval()
    total_loss, correct, n = 0.0, 0, len(data.y_test)
    for start in range(0, n, 2000):
        x = data.x_test[start : start + 2000]
        y = data.y_test[start : start + 2000]
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    values: dict[str, float | None] = {}
    for read, _ in probes:
        values.update({key: _finite(float(v)) for key, v in read().items()})  # strict JSON: NaN becomes null
    values.update({key: _finite(float(v)) for key, v in measure().items()})
    row: dict[str, Any] = {"step": step, "arm": job.arm, "seed": job.seed}
    if job.point:
        row["point"] = dict(job.point)
    row.update({
        "train_loss": train_loss, "train_loss_sd": train_sd, "test_loss": _finite(total_loss / n),
        "test_acc": correct / n, "wall_time": round(wall, 6), "probes": values,
    })
    if diverged:
        row["diverged"] = True
    return row


def _save(path: Path, job: Job, model, optimizer, sampler, window, step, wall, rows, diverged, device) -> None:
    # "config" is the run's config at this job's grid point, so that normlab inspect/fold can
    # rebuild the model from the checkpoint and its "arm" alone.
    config = config_to_dict(point_config(config_from_dict(job.config), dict(job.point)))
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "window": torch.stack(window).cpu() if window else torch.zeros(0), "step": step, "wall_time": wall,
        "rows": rows, "diverged": diverged, "config": config, "arm": job.arm, "seed": job.seed,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ----------------------------------------------------------------------------------------------
# Runs


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
        progress: show a progress bar with ETA (tqdm) on stderr.
        data: a loaded data set (else loaded from ``config.data``; worker processes load their own).
        jobs: worker processes (1: every job in this process, one after another).

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
    ):
        self.experiment, self.config = experiment, config
        self.paths = RunPaths(Path(run_dir))
        self.resume, self.progress, self.workers = resume, progress, jobs
        self.device = resolve_device(config.train.device)
        self.team: Team = join(self.device)
        configs = self._check_config()
        self.data = data or dataset_for(config, self.device)
        for cfg in configs:
            if cfg.train.batch_size > len(self.data.y_train):
                raise ConfigError(f"train.batch_size={cfg.train.batch_size} exceeds the {len(self.data.y_train)} "
                                  f"training samples of {cfg.data.name}; lower it.")

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
        configs = [arm_config(self.config, arm, point) for point in grid_points(self.config) for arm in self.config.arms]
        for cfg in configs:
            check_model_config(cfg.model)
            make_optimizer(cfg.train, nn.Linear(1, 1))
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
        else:
            self.paths.root.mkdir(parents=True, exist_ok=True)
            save_config(self.config, saved)

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
        execute([self], jobs=self.workers, progress=self.progress)
        return self.rows()


def execute(runs: Sequence[Trainer], *, jobs: int = 1, progress: bool = True,
            finished: Callable[[Trainer], None] = lambda run: None) -> None:
    """Run the unfinished jobs of several runs through one executor (``jobs`` worker processes,
    or this process for 1) and write each finished job into its run folder as it ends;
    ``finished(run)`` is called when a run's last job is done. Metrics files are left in job
    order even when the run stops early."""
    from .executor import make_executor

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
            make_executor(jobs, team=team).run(
                [job for _, job in pending], done=done, progress=bar.update,
                data_of=lambda job: owner[(job.run_dir, job.key)].data,
            )
    finally:
        for run in runs:
            if run.team.main:
                run._write_metrics()


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="step", dynamic_ncols=True, leave=False)


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
