"""The lab's training loop: seeded, evaluated every k steps, checkpointed, resumable.

A run trains every (seed, arm) pair of an experiment. Each pair is a *job*: its model is
initialized from the seed (arms of one seed share their initial weights and batches), and it
writes one row per evaluation to ``metrics.jsonl``::

    {"step", "arm", "seed", "train_loss", "test_loss", "test_acc", "wall_time", "probes": {...}}

``wall_time`` counts training seconds only (evaluation excluded). A job checkpoints its whole
state (model, optimizer, batch order, random state, partial loss sums) every
``checkpoint_every`` steps and when it ends or is interrupted, so ``resume=True`` continues a
stopped run where it stopped and ends with the same metrics as an uninterrupted run; finished
jobs are never redone.

>>> from normlab.lab.config import ExperimentConfig
>>> # Trainer(experiment, config, "runs/demo").run() -> list of metrics rows
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, ExperimentConfig, arm_config, config_to_dict, save_config
from .data import Dataset, load_dataset
from .distributed import Team, join
from .experiments.base import Experiment
from .runfiles import append_jsonl, atomic_write_bytes, read_jsonl, write_jsonl
from .models import build_model

__all__ = ["Interrupted", "RunPaths", "Trainer", "BatchSampler", "resolve_device"]


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

    def checkpoint(self, arm: str, seed: int) -> Path:
        return self.root / "checkpoints" / f"{arm}-seed{seed}.pt"


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


@contextmanager
def _stop_on_signals(flag: dict[str, bool]) -> Iterator[None]:
    """Turn the first SIGINT/SIGTERM into a request to stop after the current step; a second one kills."""

    def request_stop(signum, frame):
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True

    try:
        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not in the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Trainer:
    """Runs one experiment's jobs into a run folder.

    Args:
        experiment: the experiment (its probes are recorded at every evaluation).
        config: the resolved config.
        run_dir: the run folder (created).
        resume: continue a stopped run in ``run_dir``; its ``config.json`` must equal ``config``.
        progress: show a progress bar with ETA (tqdm) on stderr.
        data: a loaded data set (else loaded from ``config.data``).
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
    ):
        self.experiment, self.config = experiment, config
        self.paths = RunPaths(Path(run_dir))
        self.resume, self.progress = resume, progress
        self.device = resolve_device(config.train.device)
        self.team: Team = join(self.device)
        self._check_config()
        self.data = (data or load_dataset(
            config.data.name, data_dir=config.data.data_dir, test_fraction=config.data.test_fraction,
            split_seed=config.data.split_seed, limit=config.data.limit,
        )).to(self.device)
        self._signal = {"stop": False}

    def _check_config(self) -> None:
        t = self.config.train
        for key in ("steps", "batch_size", "seeds", "eval_every", "checkpoint_every"):
            if getattr(t, key) <= 0:
                raise ConfigError(f"train.{key} must be a positive int, got {getattr(t, key)!r}.")
        if not self.config.arms:
            raise ConfigError("the experiment has no arms to train; give at least one in config.arms.")
        if t.batch_size % self.team.world:
            raise ConfigError(
                f"train.batch_size={t.batch_size} must split evenly over the {self.team.world} processes "
                f"(each takes an equal slice of the global batch); choose a multiple of {self.team.world}."
            )

    # -- the run ---------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Train every job not already finished; return all metrics rows. Raises :class:`Interrupted`."""
        problem = None
        if self.team.main:
            try:
                self._prepare_folder()
            except ConfigError as err:
                problem = str(err)
        problem = self.team.share(problem)  # every process stops on rank 0's error, none waits
        if problem:
            raise ConfigError(problem)
        jobs = [(arm, seed) for seed in range(self.config.train.seeds) for arm in self.config.arms]
        total = len(jobs) * self.config.train.steps
        with _stop_on_signals(self._signal), self._progress_bar(total) as bar:
            for arm, seed in jobs:
                self._run_job(arm, seed, bar)
        return read_jsonl(self.paths.metrics) if self.team.main else []

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
        self.paths.metrics.touch()

    def _progress_bar(self, total: int):
        from tqdm.auto import tqdm

        return tqdm(total=total, disable=not (self.progress and self.team.main), unit="step",
                    dynamic_ncols=True, leave=False)

    # -- one job ---------------------------------------------------------------------------
    def _run_job(self, arm: str, seed: int, bar) -> None:
        cfg = arm_config(self.config, arm)
        steps, every = cfg.train.steps, cfg.train.eval_every
        ckpt_path = self.paths.checkpoint(arm, seed)
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True) if self.resume and ckpt_path.exists() else None
        if state is not None and state["step"] >= steps:
            bar.update(steps)
            return
        torch.manual_seed(seed)
        model = build_model(cfg.model, self.data.input_shape, self.data.num_classes).to(self.device)
        if self.team.active and cfg.train.sync_bn:
            from ..surgery.sync import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)  # a deep copy: model.blocks follows it
        optimizer = make_optimizer(cfg.train, model)
        sampler = BatchSampler(len(self.data.y_train), cfg.train.batch_size, seed)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        loss_count, step, wall = 0, 0, 0.0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            sampler.load_state_dict(state["sampler"])
            torch.set_rng_state(state["torch_rng"])
            if self.device.type == "cuda" and state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            loss_sum = state["loss_sum"].to(self.device)
            loss_count, step, wall = state["loss_count"], state["step"], state["wall_time"]
        if self.team.main:
            self._drop_rows_after(arm, seed, step if state is not None else -1)
        # Every process trains its slice of each global batch through DDP, which averages the
        # gradients; rank 0 alone evaluates, on the unwrapped model.
        trained = model
        if self.team.active:
            from torch.nn.parallel import DistributedDataParallel

            trained = DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        bar.update(step)
        bar.set_description(f"{arm} seed {seed}")

        probes = [probe.attach(model) for probe in self.experiment.probes(cfg, arm)]
        try:
            if state is None and self.team.main:
                self._evaluate(model, probes, arm, seed, 0, None, 0.0)
            x_train, y_train = self.data.x_train, self.data.y_train
            model.train()
            started = time.perf_counter()
            while step < steps:
                idx = sampler.next()  # CPU indices also index tensors on an accelerator
                if self.team.active:
                    idx = idx.view(self.team.world, -1)[self.team.rank]
                loss = F.cross_entropy(trained(x_train[idx]), y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += loss.detach()
                loss_count += 1
                step += 1
                bar.update(1)
                if step % every == 0 or step == steps:
                    wall += time.perf_counter() - started
                    train_loss = self.team.mean(loss_sum / loss_count).item()
                    loss_sum.zero_()
                    loss_count = 0
                    if self.team.main:
                        self._evaluate(model, probes, arm, seed, step, train_loss, wall)
                    model.train()
                    started = time.perf_counter()
                # All processes stop at the same step, or the others would wait in a collective.
                stopping = self.team.any(self._signal["stop"])
                if step % cfg.train.checkpoint_every == 0 or step == steps or stopping:
                    wall += time.perf_counter() - started
                    if self.team.main:
                        self._save(ckpt_path, arm, model, optimizer, sampler, loss_sum, loss_count, step, wall)
                    self.team.barrier()  # the checkpoint is on disk before anyone may resume from it
                    started = time.perf_counter()
                if stopping:
                    raise Interrupted(f"stopped at step {step} of {arm} seed {seed}; checkpoint saved")
        finally:
            for _, remove in probes:
                remove()

    @torch.no_grad()
    def _evaluate(self, model, probes, arm, seed, step, train_loss, wall) -> None:
        model.eval()
        total_loss, correct, n = 0.0, 0, len(self.data.y_test)
        for start in range(0, n, 2000):
            x = self.data.x_test[start : start + 2000]
            y = self.data.y_test[start : start + 2000]
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
        values: dict[str, float] = {}
        for read, _ in probes:
            values.update(read())
        row = {
            "step": step, "arm": arm, "seed": seed,
            "train_loss": train_loss, "test_loss": total_loss / n, "test_acc": correct / n,
            "wall_time": round(wall, 6), "probes": values,
        }
        append_jsonl(self.paths.metrics, [row])

    def _save(self, path: Path, arm: str, model, optimizer, sampler, loss_sum, loss_count, step, wall) -> None:
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "sampler": sampler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "loss_sum": loss_sum.cpu(), "loss_count": loss_count, "step": step, "wall_time": wall,
            "config": config_to_dict(self.config), "arm": arm,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue())

    def _drop_rows_after(self, arm: str, seed: int, step: int) -> None:
        """Forget this job's rows written after its checkpoint (they will be written again)."""
        rows = read_jsonl(self.paths.metrics, warn=False)
        keep = [r for r in rows if not (r["arm"] == arm and r["seed"] == seed and r["step"] > step)]
        # Rewriting also drops a torn last line, so that new rows never follow half a line.
        write_jsonl(self.paths.metrics, keep)


def _diff_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _diff_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
