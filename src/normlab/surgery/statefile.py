"""Saved models: read a checkpoint file safely, and tabulate the health of its norms.

A *checkpoint* here is a file written by ``torch.save`` that ``torch.load(path,
weights_only=True)`` reads (no code runs while loading; a whole pickled ``nn.Module`` is refused
for that reason) and that holds one of:

* a **state dict**: ``torch.save(model.state_dict(), path)``, a mapping of names to tensors;
* a dict with the state dict under ``"model"`` (or ``"state_dict"``), such as the checkpoints
  of normlab's lab, ``{"model": state_dict, "config": resolved config, "step": ..., ...}``.

:func:`load_checkpoint` reads both; :func:`norm_table` lists the normalization layers (the
modules with running statistics, or with the model at hand the exact layer classes) and the
health of their statistics (:func:`normlab.surgery.stats_problems`). ``normlab inspect`` and
``normlab fold`` use them; rebuilding a lab model from its checkpoint is the lab's business
(:mod:`normlab.lab.checkpoint`), since the model tools never import the lab.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .diagnose import is_norm, stats_problems

__all__ = ["CheckpointError", "load_checkpoint", "norm_table", "read_torch_file"]

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
    data = read_torch_file(path)
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


def read_torch_file(path: str | Path, *, expected: str | None = _WHAT) -> Any:
    """What ``torch.load(path, map_location="cpu", weights_only=True)`` reads from ``path``.

    A file it cannot read gets one line in normlab's words (empty, not a torch file, a damaged
    or truncated one, or a pickled object that a safe load refuses), never torch's own
    multi-line text with its terminal escape codes. ``expected`` (what a readable file would
    hold) ends the message.

    Raises:
        CheckpointError: the file is missing or torch cannot load it with ``weights_only=True``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file.")
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise CheckpointError(f"cannot read {str(path)!r}: {err.strerror or err}.") from None
    if not head:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes), not a PyTorch checkpoint{_reads(expected)}.")
    try:
        with warnings.catch_warnings():  # torch's note on old pickle protocols: the checks below say more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure is described below, in one line
        raise CheckpointError(f"{str(path)!r} {_load_failure(head, err)}{_reads(expected)}.") from err


def _reads(expected: str | None) -> str:
    return f"; normlab reads {expected}" if expected else ""


def _load_failure(head: bytes, err: Exception) -> str:
    """Why torch.load failed, from the file's first bytes and the exception's kind."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err)) if isinstance(err, pickle.UnpicklingError) else None
    if refused:
        return (f"holds a pickled {refused.group(1)}, which torch.load(weights_only=True) refuses because loading "
                f"it could run code (a whole nn.Module saved with torch.save(model)?); save model.state_dict() instead")
    if head.startswith(b"PK"):  # torch.save's zip format
        return "is a damaged or truncated PyTorch checkpoint (its zip archive cannot be read); save it again"
    if head[:1] == b"\x80":  # a pickle (torch's legacy format) that does not load
        return "is not a PyTorch checkpoint (a pickle that torch.load cannot read: damaged, truncated or not torch's)"
    return "is not a PyTorch checkpoint (torch.save writes a zip archive)"


def _is_state_dict(mapping: Mapping) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in mapping.items())


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
    # Per-step statistics (T, C) of a recurrent batch norm: C is the last dimension.
    channels = next((t.shape[-1] for t in (rm, weight) if isinstance(t, Tensor) and t.dim() >= 1), None)
    problems = stats_problems(name, rm, rv, nbt)
    cells = [
        name, kind, str(channels or "-"),
        (str(int(nbt.max())) if nbt.numel() else "0") if isinstance(nbt, Tensor) else "-",
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


def norm_table(header: str, state: dict[str, Tensor], model: nn.Module | None = None) -> str:
    """A table of the normalization layers of a saved model and the health of their statistics.

    Args:
        header: the report's first line (what was read).
        state: the state dict.
        model: the model the state dict was loaded into, when known: its norms are listed by
            class (:func:`normlab.surgery.diagnose.is_norm`); otherwise the norms are guessed from the
            state dict's keys (modules with running statistics, or a 1-D affine weight).

    Returns:
        The report as text: the header, one row per layer (name, type, channels, batches
        counted, largest |running_mean|, smallest and largest running_var, health), and the
        problems found.
    """
    rows: list[tuple[str, str, dict[str, Any]]] = []
    if model is not None:
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
