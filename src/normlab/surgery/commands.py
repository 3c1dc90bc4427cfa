"""What ``normlab inspect CHECKPOINT`` and ``normlab fold CHECKPOINT OUT`` do.

A *checkpoint* here is a file written by ``torch.save`` that ``torch.load(path,
weights_only=True)`` reads (no code runs while loading; a whole pickled ``nn.Module`` is refused
for that reason) and that holds one of:

* a **state dict**: ``torch.save(model.state_dict(), path)``, a mapping of names to tensors;
* a dict with the state dict under ``"model"`` (or ``"state_dict"``), such as the checkpoints
  of normlab's lab, ``{"model": state_dict, "config": resolved config, "step": ..., ...}``.

``inspect`` works on both: it lists the normalization layers (the modules with running
statistics, and with a lab config the exact layer classes) and the health of their statistics
(:func:`normlab.surgery.stats_problems`).

``fold`` needs the architecture, which a state dict does not hold, so it takes lab checkpoints:
the model is rebuilt from the saved config (the arm from ``arm=``, the checkpoint's ``"arm"``,
or its file name ``ARM-seedN.pt``; input size and classes from the weights), folded with
:func:`normlab.surgery.fold_batchnorm`, checked on a random batch, and written as a lab
checkpoint of the folded model: its config has ``model.norm = "none"``, which rebuilds the
folded architecture (``build_model`` + ``load_state_dict``), plus the fold report. For any
other model, load it in Python and call ``fold_batchnorm(model)``.
"""

from __future__ import annotations

import copy
import io
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diagnose import is_norm, stats_problems
from ..layers.kinds import is_batchnorm
from .fold import fold_batchnorm

__all__ = ["CheckpointError", "fold_checkpoint", "inspect_checkpoint", "load_checkpoint"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class CheckpointError(ValueError):
    """The file is missing, is not a checkpoint, or is a kind of checkpoint the command cannot use."""


_WHAT = ("a state dict (torch.save(model.state_dict(), path)) or a dict holding one under 'model' "
         "(normlab's lab checkpoints)")


def load_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``(state_dict, the whole loaded dict)`` from a checkpoint file, loaded with ``weights_only=True``.

    Raises:
        CheckpointError: a missing file, a file torch cannot load safely, or other content.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    try:
        with warnings.catch_warnings():  # torch's note on old pickle protocols: the checks below say more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{str(path)!r} holds objects that torch.load(weights_only=True) refuses to unpickle (for instance "
            f"a whole nn.Module saved with torch.save(model)), which could run code: "
            f"{str(err).splitlines()[0][:200]}. Save model.state_dict() instead; normlab reads {_WHAT}."
        ) from None
    except Exception as err:  # zip/pickle format errors of every kind: not a torch file
        raise CheckpointError(
            f"{str(path)!r} is not a PyTorch checkpoint (torch.load failed: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200] if str(err) else ''}); normlab reads {_WHAT}."
        ) from None
    if isinstance(data, Mapping):
        for key in ("model", "state_dict"):
            inner = data.get(key)
            if isinstance(inner, Mapping) and _is_state_dict(inner):
                return dict(inner), dict(data)
        if data and _is_state_dict(data):
            return dict(data), {}
    raise CheckpointError(
        f"{str(path)!r} loads, but holds a {type(data).__name__}"
        f"{' with keys ' + repr(sorted(map(str, data))[:8]) if isinstance(data, Mapping) else ''}, not "
        f"{_WHAT}."
    )


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in mapping.items())


# --------------------------------------------------------------------------------------------
# Rebuilding a lab model
# --------------------------------------------------------------------------------------------


def _lab_model(state: dict[str, Tensor], meta: dict[str, Any], path: Path, arm: str | None
               ) -> tuple[nn.Module, str, Any, tuple[int, ...]]:
    """The lab model of a checkpoint, loaded: ``(model, arm, arm config, input shape)``."""
    from ..lab.config import arm_config, config_from_dict
    from ..lab.models import build_model

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


# --------------------------------------------------------------------------------------------
# inspect
# --------------------------------------------------------------------------------------------


def _layers_from_state(state: dict[str, Tensor]) -> list[tuple[str, str, dict[str, Tensor]]]:
    """``(prefix, kind, tensors)`` of the modules that look like norms in a bare state dict."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    rows = []
    for prefix, tensors in groups.items():
        if "running_mean" in tensors and "running_var" in tensors:
            rows.append((prefix, "batch/instance norm", tensors))
        elif set(tensors) <= {"weight", "bias"} and "weight" in tensors and tensors["weight"].dim() == 1:
            rows.append((prefix, "affine only (layer/group/RMS norm?)", tensors))
    return rows


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _row(name: str, kind: str, tensors: dict[str, Any]) -> tuple[list[str], list[str]]:
    rm, rv, nbt = (tensors.get(k) for k in _STATS)
    weight = tensors.get("weight")
    channels = next((t.shape[0] for t in (rm, weight) if isinstance(t, Tensor) and t.dim() == 1), None)
    problems = stats_problems(name, rm, rv, nbt)
    cells = [
        name, kind, str(channels or "-"),
        str(int(nbt)) if isinstance(nbt, Tensor) else "-",
        _fmt(float(rm.detach().float().abs().max())) if isinstance(rm, Tensor) and rm.numel() else "-",
        _fmt(float(rv.detach().float().min())) if isinstance(rv, Tensor) and rv.numel() else "-",
        _fmt(float(rv.detach().float().max())) if isinstance(rv, Tensor) and rv.numel() else "-",
        "ok" if not problems else ", ".join(sorted({p.kind for p in problems})),
    ]
    if rm is None:
        cells[-1] = "no running stats"
    return cells, [str(p) for p in problems]


def _table(rows: list[list[str]]) -> str:
    header = ["layer", "type", "C", "batches", "max |mean|", "min var", "max var", "health"]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def inspect_checkpoint(path: str | Path) -> str:
    """A table of the normalization layers of a saved model and the health of their statistics.

    Args:
        path: a checkpoint (see the module's docstring).

    Returns:
        The report as text: a header line, one row per layer (name, type, channels, batches
        counted, largest |running_mean|, smallest and largest running_var, health), and the
        problems found.

    Raises:
        CheckpointError: (a ValueError) for a missing file or one that is not a checkpoint.
    """
    path = Path(path)
    state, meta = load_checkpoint(path)
    header = f"{path}: state dict with {len(state)} tensors"
    rows: list[tuple[str, str, dict[str, Any]]] = []
    if "config" in meta:
        try:
            model, arm, cfg, _ = _lab_model(state, meta, path, None)
        except Exception as err:  # fall back to the state dict alone, saying why
            header += f" (lab checkpoint; the model could not be rebuilt: {err})"
        else:
            step = f", step {meta['step']}" if "step" in meta else ""
            header = (f"{path}: lab checkpoint of experiment {meta['config'].get('experiment')!r}, arm {arm!r}"
                      f"{step} ({cfg.model.kind}, norm {cfg.model.norm!r})")
            for name, m in model.named_modules():
                if is_norm(m):
                    tensors = {k: getattr(m, k, None) for k in (*_STATS, "weight")}
                    rows.append((name, type(m).__name__, {k: v for k, v in tensors.items() if isinstance(v, Tensor)}))
    if not rows:
        rows = _layers_from_state(state)
    if not rows:
        return f"{header}\nno normalization layers found (no module with running statistics or a 1-D affine weight)."
    cells, problems = [], []
    for name, kind, tensors in rows:
        row, found = _row(name, kind, tensors)
        cells.append(row)
        problems += found
    unhealthy = sum(1 for row in cells if row[-1] not in ("ok", "no running stats"))
    lines = [header, _table(cells), f"{len(cells)} normalization layer(s), {unhealthy} with problems"]
    if problems:
        lines += ["problems:"] + [f"  {p}" for p in problems]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# fold
# --------------------------------------------------------------------------------------------


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
    model, arm, cfg, input_shape = _lab_model(state, meta, src, arm)
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
    from ..lab.config import config_to_dict

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
