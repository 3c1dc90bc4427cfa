"""One job of the lab: an (experiment, arm, grid point, seed) trained to its end, checkpointed
and resumable, in this process or a worker's.

A job's model is initialized from the seed (arms and grid points of one seed share their
initial weights, as far as the model shapes agree, and their batches), it trains with one torch
thread, and it gives one row per evaluation::

    {"step", "arm", "seed", ["point",] "train_loss", "train_loss_sd", "test_loss", "test_acc",
     "wall_time", "probes": {...}[, "diverged": true][, "train_eval_loss", "train_acc", "train_test_gap"]}

``point`` (the grid point, ``{axis: value}``) is there only when the experiment has a grid.
With ``train.eval_train`` each row also has the eval-mode loss and accuracy on the training split
(its first ``TRAIN_EVAL_LIMIT`` samples, without augmentation) and ``train_acc - test_acc``.
With ``data.augment`` each training batch is shifted/rotated (:mod:`normlab.lab.augment`).
``train_loss`` is the mean loss of the steps since the last evaluation and ``train_loss_sd``
their standard deviation (step-to-step variation); ``wall_time`` counts training seconds only.
A job whose loss becomes NaN or infinite stops there: its last row says ``"diverged": true``.
A job checkpoints its whole state every ``checkpoint_every`` steps and when it is stopped
(:mod:`normlab.lab.checkpoint`), so a resumed job ends with the same rows as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .augment import augment_batch, check_augment
from .checkpoint import load_job_checkpoint, save_job_checkpoint
from .config import ConfigError, ExperimentConfig, arm_config, config_from_dict
from .data import Dataset, load_dataset
from .distributed import Team
from .experiments.base import Experiment
from .experiments.registry import get_experiment
from .models import build_model

__all__ = ["TRAINABLE", "BatchSampler", "Interrupted", "Job", "RunPaths", "check_optimizer", "job_key", "one_thread",
           "resolve_device", "run_job", "trainable_parameters"]


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

    @property
    def log(self) -> Path:
        """Lines about how the run ran (the Ray executor's cluster and retries)."""
        return self.root / "log.txt"


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


# train.trainable: which parameters an optimizer trains (the others are frozen at their init).
TRAINABLE = ("all", "norm", "output", "norm+output")


def _norm_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The weights and biases of the blocks' norms (gamma and beta), in model order."""
    return [p for block in getattr(model, "blocks", []) for name, child in block.named_children()
            if name == "norm" for p in child.parameters()]


def _output_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's last ``nn.Linear``: the output layer of every lab model."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return list(linears[-1].parameters()) if linears else []


def trainable_parameters(config, model: nn.Module) -> list[nn.Parameter]:
    """The parameters ``train.trainable`` selects, after setting ``requires_grad`` False on all others.

    ``"all"``: every parameter; ``"norm"``: the blocks' norm weights and biases (Frankle et al.
    2020's BatchNorm-only training); ``"output"``: the last layer (a linear classifier on random
    features); ``"norm+output"``: both. Frozen parameters keep their initial values bitwise.

    Raises:
        ConfigError: an unknown choice, or one that selects no parameter of this model (e.g.
            ``"norm"`` with ``model.norm="none"``: there is nothing to train).
    """
    choice = config.trainable
    if choice not in TRAINABLE:
        raise ConfigError(f"train.trainable must be one of {list(TRAINABLE)}, got {choice!r}.")
    if choice == "all":
        return list(model.parameters())
    chosen = {id(p): p for part in choice.split("+")
              for p in (_norm_parameters(model) if part == "norm" else _output_parameters(model))}
    if "norm" in choice and not _norm_parameters(model):
        raise ConfigError(f"train.trainable={choice!r} trains the norms' weights and biases, but this model has "
                          f"none (model.norm 'none', a norm without affine parameters, or a model without blocks "
                          f"such as kind 'lstm'); set a norm with weights (e.g. model.norm='batch') or another "
                          f"train.trainable.")
    for p in model.parameters():
        if id(p) not in chosen:
            p.requires_grad_(False)
    return list(chosen.values())


def make_optimizer(config, model: nn.Module) -> torch.optim.Optimizer:
    """SGD (with optional momentum) or Adam, with the config's learning rate and weight decay,
    over the parameters ``config.trainable`` selects (:func:`trainable_parameters`; the rest are
    frozen)."""
    if config.optimizer not in ("sgd", "adam"):
        raise ConfigError(f"train.optimizer must be 'sgd' or 'adam', got {config.optimizer!r}.")
    params = trainable_parameters(config, model)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def check_optimizer(config: ExperimentConfig) -> None:
    """Raise the ``ConfigError`` :func:`make_optimizer` would raise for a job of ``config``, before
    any job runs: it builds the model on a small image (off the global random stream) and picks
    the trainable parameters, so a selection that is empty for this model fails early."""
    with torch.random.fork_rng(devices=[]):
        make_optimizer(config.train, build_model(config.model, (1, 8, 8), 2))


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
    check_augment(cfg.data)
    experiment = get_experiment(job.experiment)
    device = resolve_device(cfg.train.device)
    team = team or Team()
    data = data if data is not None else dataset_for(cfg, device)
    paths = RunPaths(Path(job.run_dir))
    ckpt_path = paths.checkpoint(job.key)
    state = load_job_checkpoint(ckpt_path) if ckpt_path.exists() else None
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
                rows.append(_evaluate(model, data, probes, job, step, train_loss, train_sd, wall, diverged, measure,
                                      cfg.train.eval_train))

        def save(diverged=False):
            if team.main:
                save_job_checkpoint(ckpt_path, job, model, optimizer, sampler, window, step, wall, rows, diverged, device,
                                    (data.input_shape, data.num_classes))
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
                x = x_train[idx]
                if cfg.data.augment != "none":  # drawn from (seed, step): a resumed job gets the same ones
                    x = augment_batch(x, cfg.data.augment, seed=job.seed, step=step, shift=cfg.data.augment_shift,
                                      degrees=cfg.data.augment_degrees, part=(team.rank, team.world))
                loss = F.cross_entropy(trained(x), y_train[idx])
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


TRAIN_EVAL_LIMIT = 10_000  # train accuracy is measured on at most this many (the first) training samples


def _loss_and_accuracy(model, x_all: torch.Tensor, y_all: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (as it is: call under eval mode) on a split."""
    total_loss, correct, n = 0.0, 0, len(y_all)
    for start in range(0, n, 2000):
        x = x_all[start : start + 2000]
        y = y_all[start : start + 2000]
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
    return total_loss / n, correct / n


@torch.no_grad()
def _evaluate(model, data, probes, job: Job, step, train_loss, train_sd, wall, diverged,
              measure: Callable[[], dict[str, float]] = dict, eval_train: bool = False) -> dict[str, Any]:
    model.eval()
    test_loss, test_acc = _loss_and_accuracy(model, data.x_test, data.y_test)
    values: dict[str, float | None] = {}
    for read, _ in probes:
        values.update({key: _finite(float(v)) for key, v in read().items()})  # strict JSON: NaN becomes null
    values.update({key: _finite(float(v)) for key, v in measure().items()})
    row: dict[str, Any] = {"step": step, "arm": job.arm, "seed": job.seed}
    if job.point:
        row["point"] = dict(job.point)
    row.update({
        "train_loss": train_loss, "train_loss_sd": train_sd, "test_loss": _finite(test_loss),
        "test_acc": test_acc, "wall_time": round(wall, 6), "probes": values,
    })
    if eval_train:  # after the probes, which read the test pass; the same eval-mode network, no augmentation
        train_loss_eval, train_acc = _loss_and_accuracy(model, data.x_train[:TRAIN_EVAL_LIMIT],
                                                        data.y_train[:TRAIN_EVAL_LIMIT])
        row.update({"train_eval_loss": _finite(train_loss_eval), "train_acc": train_acc,
                    "train_test_gap": train_acc - test_acc})
    if diverged:
        row["diverged"] = True
    return row


# ----------------------------------------------------------------------------------------------
# Runs
