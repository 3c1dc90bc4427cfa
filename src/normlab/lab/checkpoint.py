"""The lab's checkpoints: written, read and turned back into a model here only.

A job's checkpoint (``RUN/checkpoints/ARM[-POINT]-seedN.pt``) is a ``torch.save`` dict that
``torch.load(weights_only=True)`` reads: ``model`` (state dict), ``optimizer``, ``sampler``,
``torch_rng``, ``cuda_rng``, ``window`` (the losses since the last evaluation), ``step``,
``wall_time``, ``rows`` (the job's metrics so far), ``diverged``, ``config`` (the run's config at
the job's grid point), ``arm`` and ``seed``. The trainer writes and resumes from it
(:func:`save_job_checkpoint`, :func:`load_job_checkpoint`); ``normlab inspect`` and ``normlab
fold`` rebuild its model (:func:`rebuild_model`) and hand it to the model tools
(:mod:`normlab.surgery`), which know nothing of the lab.
"""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..layers.kinds import is_batchnorm
from ..surgery.fold import fold_batchnorm
from ..surgery.statefile import CheckpointError, load_checkpoint, norm_table, read_torch_file
from .config import arm_config, config_from_dict, config_to_dict, point_config
from .experiments import all_experiments
from .models import build_model
from .runfiles import atomic_write_bytes

if TYPE_CHECKING:
    from .job import Job

__all__ = ["fold_checkpoint", "inspect_checkpoint", "load_job_checkpoint", "rebuild_model", "run_checkpoints",
           "save_job_checkpoint"]


def save_job_checkpoint(path: Path, job: "Job", model: nn.Module, optimizer, sampler, window: list[Tensor], step: int,
                        wall: float, rows: list[dict[str, Any]], diverged: bool, device: torch.device,
                        shape: tuple[tuple[int, ...], int] | None = None) -> None:
    """Write a job's checkpoint atomically (a crash leaves the previous one whole)."""
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
    if shape is not None:  # the data's input shape and classes: rebuild_model needs no guess
        state["input_shape"], state["num_classes"] = list(shape[0]), int(shape[1])
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_job_checkpoint(path: Path) -> dict[str, Any]:
    """A job's checkpoint, to resume from; a ``CheckpointError`` (a ``ValueError``) in one line
    says to delete an unreadable one, and what is wrong with it."""
    advice = "cannot resume from a job's checkpoint; delete it to train the job again from the start"
    try:
        state = read_torch_file(path, expected=None)
    except CheckpointError as err:
        raise CheckpointError(f"{advice}: {err}") from err
    missing = sorted(_JOB_KEYS - set(state)) if isinstance(state, dict) else sorted(_JOB_KEYS)
    if missing:
        raise CheckpointError(f"{advice}: {str(path)!r} loads but is not one that normlab run writes "
                              f"(no {', '.join(missing)}).")
    return state


_JOB_KEYS = frozenset({"model", "optimizer", "sampler", "torch_rng", "window", "step", "wall_time", "rows"})


def rebuild_model(state: dict[str, Tensor], meta: dict[str, Any], path: Path, arm: str | None
               ) -> tuple[nn.Module, str, Any, tuple[int, ...]]:
    """The lab model of a checkpoint, loaded: ``(model, arm, arm config, input shape)``.

    The arm comes from ``arm``, the checkpoint's ``"arm"``, its file name ``ARM-seedN.pt``, or
    the experiment's only arm; the input size and classes from the weights. The experiment's
    :meth:`~normlab.lab.experiments.base.Experiment.job_config` is applied when the experiment
    is known, so that the model is the one the job trained.

    Raises:
        CheckpointError: the arm cannot be told, or the weights do not fit the rebuilt model.
    """
    config = config_from_dict(meta["config"])
    arms = list(config.arms)
    if arm is None:
        arm = meta.get("arm")
    if arm is None:
        stem = re.match(r"^(.+)-seed\d+$", path.stem)
        if stem and stem.group(1) in arms:
            arm = stem.group(1)
    if arm is None and len(arms) == 1:
        arm = arms[0]
    if arm is None:
        raise CheckpointError(
            f"{str(path)!r}: cannot tell which arm of the experiment this checkpoint trained (its name is not "
            f"ARM-seedN.pt); pass it with arm=..., one of {arms}."
        )
    if arm not in arms:
        raise CheckpointError(f"{str(path)!r}: unknown arm {arm!r}; the checkpoint's experiment has arms {arms}.")
    cfg = arm_config(config, arm)
    if config.experiment in all_experiments():
        cfg = all_experiments()[config.experiment].job_config(cfg)
    if "input_shape" in meta and "num_classes" in meta:
        input_shape, num_classes = tuple(int(d) for d in meta["input_shape"]), int(meta["num_classes"])
    else:  # checkpoints written before the shapes were saved
        input_shape, num_classes = _shapes_from_weights(state, cfg.model.kind, path)
    model = build_model(cfg.model, input_shape, num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"{str(path)!r}: the weights do not fit the model its config builds for arm {arm!r}: "
            f"{str(err).splitlines()[0]} ..."
        ) from None
    return model.eval(), arm, cfg, input_shape


def _shapes_from_weights(state: dict[str, Tensor], kind: str, path: Path) -> tuple[tuple[int, ...], int]:
    layers = [v for k, v in state.items() if k.endswith("layer.weight")]
    heads = [v for k, v in state.items() if k.endswith(".weight") and v.dim() == 2]
    if not layers or not heads:
        raise CheckpointError(f"{str(path)!r}: no lab model weights (keys '*.layer.weight') in the checkpoint.")
    first = layers[0]
    # The lab's models do not depend on the spatial size (global pooling) or the input's shape
    # beyond its flattened width (MLP), so the weights determine the architecture.
    input_shape = (first.shape[1], 8, 8) if kind == "cnn" else (first.shape[1],)
    return input_shape, heads[-1].shape[0]




def run_checkpoints(path: str | Path, *, arm: str | None = None, seed: int | None = None) -> list[Path]:
    """The checkpoint files ``normlab inspect`` and ``normlab fold`` take for ``path``: the file
    itself, or for a run folder (or its ``checkpoints/``) its ``ARM[-POINT]-seedN.pt`` files of
    ``arm`` and ``seed`` (all when not given), in name order.

    Raises:
        CheckpointError: the folder holds no checkpoint (of that arm and seed).
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    found = sorted(folder.glob("*.pt"))
    chosen = [p for p in found if (arm is None or re.match(rf"^{re.escape(arm)}(-.+)?-seed\d+$", p.stem))
              and (seed is None or p.stem.endswith(f"-seed{seed}"))]
    if not chosen:
        which = " and ".join(x for x in (arm and f"arm {arm!r}", seed is not None and f"seed {seed}") if x)
        names = ", ".join(p.name for p in found[:12]) + (", ..." if len(found) > 12 else "")
        raise CheckpointError(f"{str(folder)!r} holds no checkpoint{' of ' + which if which else ''} "
                              f"({'it has: ' + names if found else 'no *.pt file'}); give a run folder or a .pt file.")
    return chosen


def inspect_checkpoint(path: str | Path) -> str:
    """``normlab inspect``: the norms of a checkpoint and the health of their statistics.

    A lab checkpoint's model is rebuilt, so the table names the exact layer classes; any other
    state dict (or a lab checkpoint whose model cannot be rebuilt, said in the header) is read
    by its keys (:func:`normlab.surgery.statefile.norm_table`).

    Raises:
        CheckpointError: (a ValueError) for a missing file or one that is not a checkpoint.
    """
    path = Path(path)
    state, meta = load_checkpoint(path)
    header = f"{path}: state dict with {len(state)} tensors"
    model = None
    if "config" in meta:
        try:
            model, arm, cfg, _ = rebuild_model(state, meta, path, None)
        except Exception as err:  # fall back to the state dict alone, saying why
            header += f" (lab checkpoint; the model could not be rebuilt: {err})"
        else:
            step = f", step {meta['step']}" if "step" in meta else ""
            header = (f"{path}: lab checkpoint of experiment {meta['config'].get('experiment')!r}, arm {arm!r}"
                      f"{step} ({cfg.model.kind}, norm {cfg.model.norm!r})")
    return norm_table(header, state, model)



def fold_checkpoint(src: str | Path, dst: str | Path, *, arm: str | None = None) -> str:
    """Fold the batch norms of a lab checkpoint's model and write the folded model to ``dst``.

    Args:
        src: a lab checkpoint (``{"model": state_dict, "config": ...}``, as ``normlab run`` writes).
        dst: the output file, a lab checkpoint of the folded model: ``{"model", "config" (with
            model.norm "none" and the one arm), "arm", "folded_from", "fold_report"}``.
        arm: which of the experiment's arms trained the checkpoint, when neither the file name
            (``ARM-seedN.pt``) nor the checkpoint says.

    Returns:
        What was folded and skipped, and the largest output difference on a random batch.

    Raises:
        CheckpointError: (a ValueError) the file is not a lab checkpoint, or nothing can be folded.
    """
    src, dst = Path(src), Path(dst)
    state, meta = load_checkpoint(src)
    if "config" not in meta:
        raise CheckpointError(
            f"{str(src)!r} is a bare state dict: folding needs the model's architecture, which it does not "
            f"hold. normlab fold takes the lab's checkpoints ({{'model': state_dict, 'config': ...}}, written by "
            f"'normlab run'); for another model, load it in Python and call "
            f"normlab.surgery.fold_batchnorm(model.eval())."
        )
    model, arm, cfg, input_shape = rebuild_model(state, meta, src, arm)
    if not any(is_batchnorm(m) for m in model.modules()):
        raise CheckpointError(f"{str(src)!r}: arm {arm!r} uses norm {cfg.model.norm!r}: there is no batch norm to fold.")
    example = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    folded, report = fold_batchnorm(model, example_inputs=example)
    if report.skipped:
        raise CheckpointError(
            f"{str(src)!r}: {len(report.skipped)} batch norm(s) cannot be folded, so the folded model would not be "
            f"a lab model: " + "; ".join(f"{s.norm}: {s.reason}" for s in report.skipped)
        )
    config = copy.deepcopy(meta["config"])
    resolved = config_to_dict(cfg)
    resolved["model"]["norm"] = "none"  # the folded blocks: layer (with bias) -> activation
    resolved["arms"] = {arm: {}}
    out = {
        "model": folded.state_dict(),
        "config": resolved,
        "arm": arm,
        "folded_from": str(src),
        "fold_report": str(report),
        "source_config": config,
    }
    buffer = io.BytesIO()
    torch.save(out, buffer)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(buffer.getvalue())
    return f"{report}\nwrote {dst} (lab checkpoint, arm {arm!r}, model.norm 'none')"
