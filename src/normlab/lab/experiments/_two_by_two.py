"""Shared reading of a two-arm, two-level experiment (no norm vs batch norm, times one grid axis
with two values, e.g. dropout off/on or augmentation off/on): each job's final values per seed,
and their differences, paired by seed.

>>> rows = [{"arm": "batch", "seed": s, "step": 100, "point": {"model.dropout": 0.0}, "test_acc": 0.9 + s / 100}
...         for s in range(3)]
>>> finals_by_seed(group_jobs(rows), "batch", "model.dropout", 0.0, "test_acc")
{0: 0.9, 1: 0.91, 2: 0.92}
"""

from __future__ import annotations

from typing import Any

from ..intervals import mean_ci
from ..rows import JobId, diverged, final, group_jobs

__all__ = ["diverged_notes", "finals_by_seed", "group_jobs", "paired", "points_ci"]


def finals_by_seed(jobs: dict[JobId, list[dict[str, Any]]], arm: str, axis: str, level: Any,
                   key: str) -> dict[Any, float]:
    """``{seed: value of key at the job's last evaluation}`` for ``arm`` at ``axis = level``
    (seeds whose value is missing or not finite, e.g. a diverged job's loss, left out)."""
    out = {}
    for job, rows in jobs.items():
        if job.arm == arm and dict(job.point).get(axis) == level:
            v = final(rows, key)
            if v is not None:
                out[job.seed] = v
    return dict(sorted(out.items()))


def paired(a: dict[Any, float], b: dict[Any, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed ``s`` in both, in seed order."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def points_ci(values: list[float], *, bounds: tuple[float, float] = (-1.0, 1.0), signed: bool = False) -> str:
    """Mean and 95% CI of accuracies (fractions) in percentage points: ``"87.1 [85.0, 89.2]"``
    (``signed``: ``"+1.2 [-0.3, +2.7]"``); ``"n/a"`` without values."""
    if not values:
        return "n/a"
    mean, low, high = mean_ci(values, bounds=bounds)
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(100 * mean)} [{f.format(100 * low)}, {f.format(100 * high)}]"


def diverged_notes(jobs: dict[JobId, list[dict[str, Any]]]) -> list[str]:
    """One note per job whose loss went NaN/inf (its last accuracies are those of a broken network)."""
    return [f"Arm {job.arm!r} at {', '.join(f'{a}={v}' for a, v in job.point)}, seed {job.seed} diverged "
            f"(loss NaN/inf) at step {rows[-1]['step']}; its final accuracies are a broken network's."
            for job, rows in sorted(jobs.items(), key=lambda kv: (kv[0].arm, str(kv[0].point), kv[0].seed))
            if diverged(rows)]
