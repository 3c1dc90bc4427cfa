"""Reading metrics rows: group them by job, and take a job's final, best or first-reaching value.

Experiments' summaries and the report's figures read ``metrics.jsonl`` rows through these, so
that "a job", "its final accuracy" and "steps to a target" mean one thing everywhere.

>>> rows = [{"arm": "bn", "seed": 0, "step": s, "test_acc": a} for s, a in ((0, .1), (50, .8), (100, .9))]
>>> jobs = group_jobs(rows)
>>> job = jobs[JobId("bn", (), 0)]
>>> final(job, "test_acc"), best(job, "test_acc"), steps_to(job, "test_acc", 0.85)
(0.9, 0.9, 100)
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple

__all__ = ["JobId", "best", "diverged", "final", "group_jobs", "point_of", "seeds_of", "steps_to", "value"]


class JobId(NamedTuple):
    """A job's identity in the metrics: arm, grid point as ``((axis, value), ...)``, seed."""

    arm: str
    point: tuple[tuple[str, Any], ...]
    seed: int


def point_of(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The row's grid point as a hashable tuple (empty without a grid)."""
    return tuple((row.get("point") or {}).items())


def value(row: dict[str, Any], key: str) -> float | None:
    """``row[key]``, else ``row["probes"][key]``; ``None`` when absent, null or not a finite number."""
    v = row[key] if key in row else (row.get("probes") or {}).get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def group_jobs(rows: Iterable[dict[str, Any]]) -> dict[JobId, list[dict[str, Any]]]:
    """Rows by job, each job's rows sorted by step (a step logged twice: the later row wins)."""
    by_step: dict[JobId, dict[Any, dict[str, Any]]] = {}
    for row in rows:
        by_step.setdefault(JobId(str(row.get("arm")), point_of(row), row.get("seed")), {})[row.get("step")] = row
    return {job: [steps[s] for s in sorted(steps)] for job, steps in by_step.items()}


def seeds_of(jobs: Iterable[JobId]) -> list[Any]:
    return sorted({job.seed for job in jobs})


def final(job_rows: list[dict[str, Any]], key: str) -> float | None:
    """The value at the job's last evaluation (``None`` if not finite there, e.g. diverged)."""
    return value(job_rows[-1], key) if job_rows else None


def best(job_rows: list[dict[str, Any]], key: str) -> float | None:
    """The largest finite value over the job's evaluations."""
    values = [v for v in (value(r, key) for r in job_rows) if v is not None]
    return max(values) if values else None


def steps_to(job_rows: list[dict[str, Any]], key: str, target: float) -> int | None:
    """The first evaluated step whose value reaches ``target`` (``None`` if none did)."""
    for row in job_rows:
        v = value(row, key)
        if v is not None and v >= target:
            return row["step"]
    return None


def diverged(job_rows: list[dict[str, Any]]) -> bool:
    """The job stopped because its loss became NaN or infinite."""
    return bool(job_rows) and bool(job_rows[-1].get("diverged"))
