"""Shared helpers for grid experiments: a job's final value at each grid point, and the width
of the range of a grid axis that trains.

Grid experiments (learning rate, initial weight scale, weight decay, ...) ask how wide the range
of a knob is over which a network trains. The statistic, used the same way everywhere:

* a grid point *trains* when its final test accuracy reaches a threshold (see
  :func:`fraction_threshold`: a declared fraction of the best mean final accuracy of the run);
* each grid point owns a *cell* of the axis: on a log axis, from the geometric midpoint with its
  lower neighbour to the one with its upper neighbour, the two end points reaching out by half
  their neighbour's spacing (so on a uniform log grid every cell is one grid step wide);
* the *trainable width* is the summed width of the cells of the points that train, in decades
  on a log axis (:func:`trainable_range`). On a uniform grid it is (points that train) x (grid step).

A width that reaches an end of the grid is censored there (the range may extend beyond the
grid): :class:`TrainableRange` says so, and experiments report it as a lower bound.

>>> widths = cell_widths([0.01, 0.1, 1.0])
>>> [round(widths[v], 3) for v in (0.01, 0.1, 1.0)]
[1.0, 1.0, 1.0]
>>> r = trainable_range({0.01: 0.2, 0.1: 0.9, 1.0: 0.95}, threshold=0.85)
>>> round(r.width, 3), r.low, r.high, r.at_high_edge
(2.0, 0.1, 1.0, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..rows import JobId, diverged, final, group_jobs

__all__ = [
    "AxisWidths", "TrainableRange", "axis_finals", "axis_widths", "best_value", "cell_widths", "censor_notes",
    "curve_note", "fraction_threshold",
    "fmt_value", "grid_inputs", "grid_values", "job_of", "job_rows", "log_grid", "mean_by_value", "trainable_range",
]


def log_grid(low_exp: float, high_exp: float, per_decade: int, digits: int = 4) -> list[float]:
    """Points ``10**k`` for ``k`` from ``low_exp`` to ``high_exp`` in steps of ``1/per_decade``,
    rounded to ``digits`` significant digits (readable job names, still uniform in log to 1e-4).

    >>> log_grid(-2, 0, 2)
    [0.01, 0.03162, 0.1, 0.3162, 1.0]
    """
    n = round((high_exp - low_exp) * per_decade)
    return [float(f"{10 ** (low_exp + i / per_decade):.{digits}g}") for i in range(n + 1)]


def fmt_value(value: Any) -> str:
    """A grid value for tables: ``0.03162`` -> ``"0.0316"``, ``3.0`` -> ``"3"``."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def cell_widths(values: Iterable[float], *, log: bool = True) -> dict[float, float]:
    """Each grid value's cell width along the axis (decades on a log axis; see the module docstring).

    A single value has width 0 (a one-point grid measures no range).

    Raises:
        ValueError: a non-positive value on a log axis.
    """
    xs = sorted(set(values))
    if log and any(x <= 0 for x in xs):
        raise ValueError(f"a log axis needs positive grid values, got {xs}.")
    pos = [math.log10(x) if log else float(x) for x in xs]
    if len(xs) < 2:
        return {x: 0.0 for x in xs}
    edges = [pos[0] - (pos[1] - pos[0]) / 2]
    edges += [(a + b) / 2 for a, b in zip(pos, pos[1:])]
    edges.append(pos[-1] + (pos[-1] - pos[-2]) / 2)
    return {x: edges[i + 1] - edges[i] for i, x in enumerate(xs)}


@dataclass(frozen=True)
class TrainableRange:
    """The grid points of one (arm, seed) that train, and the width of their cells.

    Attributes:
        width: summed cell width of the points that train (decades on a log axis); 0 if none.
        low, high: the smallest and largest grid value that trains (``None`` if none does).
        points: the number of grid points that train.
        at_low_edge, at_high_edge: the grid's first / last value trains (the range may go on).
    """

    width: float
    low: float | None
    high: float | None
    points: int
    at_low_edge: bool
    at_high_edge: bool

    @property
    def censored(self) -> bool:
        return self.at_low_edge or self.at_high_edge


def trainable_range(by_value: Mapping[float, float | None], threshold: float, *, log: bool = True,
                    grid: Iterable[float] | None = None) -> TrainableRange:
    """Which of ``by_value``'s grid points train (value ``>= threshold``; ``None``, e.g. a missing
    or non-finite value, never does) and their summed cell width.

    ``grid``: the whole axis (default: the keys of ``by_value``); cells are measured on it, so a
    point missing from ``by_value`` counts as not training rather than widening its neighbours.
    """
    axis = sorted(set(grid) if grid is not None else set(by_value))
    widths = cell_widths(axis, log=log)
    trained = [x for x in axis if (v := by_value.get(x)) is not None and v >= threshold]
    return TrainableRange(
        width=sum(widths[x] for x in trained), low=trained[0] if trained else None,
        high=trained[-1] if trained else None, points=len(trained),
        at_low_edge=bool(trained) and trained[0] == axis[0], at_high_edge=bool(trained) and trained[-1] == axis[-1],
    )


def axis_finals(rows: Iterable[dict[str, Any]], axis: str, key: str = "test_acc", *,
                keep_diverged: bool = False) -> dict[str, dict[Any, dict[float, float | None]]]:
    """``{arm: {seed: {axis value: final value}}}`` over the jobs of a run with a grid axis ``axis``.

    A job that diverged (its loss went NaN/inf and it stopped) gives ``None`` (it never counts as
    training), not the accuracy of its broken network; with ``keep_diverged`` it gives that final
    value as it is, as the report's "grid" figures draw it. Rows without ``axis`` in their grid
    point are skipped.
    """
    out: dict[str, dict[Any, dict[float, float | None]]] = {}
    for job, job_rows in group_jobs(rows).items():
        point = dict(job.point)
        if axis not in point:
            continue
        v = None if diverged(job_rows) and not keep_diverged else final(job_rows, key)
        out.setdefault(job.arm, {}).setdefault(job.seed, {})[point[axis]] = v
    return out


def mean_by_value(per_seed: Mapping[Any, Mapping[float, float | None]]) -> dict[float, float | None]:
    """The mean over seeds at each grid value, counting a seed's ``None`` as ``missing`` for
    that value: the mean is ``None`` unless every seed has a number there."""
    values = sorted({x for by in per_seed.values() for x in by})
    out: dict[float, float | None] = {}
    for x in values:
        vs = [by.get(x) for by in per_seed.values()]
        out[x] = None if any(v is None for v in vs) or not vs else sum(vs) / len(vs)
    return out


def best_value(means: Mapping[float, float | None]) -> float | None:
    """The grid value with the largest mean (ties: the smallest value); ``None`` if none has one."""
    scored = [(v, x) for x, v in means.items() if v is not None]
    if not scored:
        return None
    top = max(v for v, _ in scored)
    return min(x for v, x in scored if v == top)


def fraction_threshold(finals: Mapping[str, Mapping[Any, Mapping[float, float | None]]],
                       fraction: float) -> float | None:
    """``fraction`` x the best mean-over-seeds final value of any arm at any grid point: the
    accuracy a grid point must reach to count as training. One threshold for the whole run, so
    every arm is held to the same bar. ``None`` when nothing has a value."""
    tops = [v for per_seed in finals.values() for v in mean_by_value(per_seed).values() if v is not None]
    return fraction * max(tops) if tops else None


def grid_values(config: Mapping[str, Any], jobs: Iterable[JobId], axis: str) -> list[Any]:
    """The values of a grid axis in the config's order; without that axis in the grid, the values
    the jobs ran at, else the config's own setting (``config`` is a run's ``config.json``)."""
    declared = list(config.get("grid", {}).get(axis, []))
    if declared:
        return declared
    section, name = axis.split(".", 1)
    return sorted({dict(j.point).get(axis, config.get(section, {}).get(name)) for j in jobs}, key=str)


def grid_inputs(rows: Iterable[dict[str, Any]], config: Mapping[str, Any], axis: str
                ) -> tuple[dict[JobId, list[dict[str, Any]]], list[str], list[Any], list[Any]]:
    """``(jobs, arms, axis values, seeds)`` of a run on a grid: what a summary starts from."""
    jobs = group_jobs(rows)
    arms = list(config.get("arms", {})) or sorted({j.arm for j in jobs})
    return jobs, arms, grid_values(config, jobs, axis), sorted({j.seed for j in jobs})


def job_rows(jobs: Mapping[JobId, list[dict[str, Any]]], config: Mapping[str, Any], arm: str, seed: Any,
             **values: Any) -> list[dict[str, Any]]:
    """One job's rows by arm, seed and grid values (``model__activation="relu"`` for the axis
    ``model.activation``); ``[]`` when that job has no rows. Axes not in the grid are ignored."""
    grid = config.get("grid", {})
    point = tuple((axis, values[axis.replace(".", "__")]) for axis in grid if axis.replace(".", "__") in values)
    return jobs.get(JobId(arm, point, seed), [])


def job_of(arm: str, axis: str, value: Any, seed: Any) -> JobId:
    """The :class:`~normlab.lab.rows.JobId` of one job on a one-axis grid (for ``group_jobs`` lookups)."""
    return JobId(arm, ((axis, value),), seed)


def _mean_present(values: Iterable[float | None]) -> float | None:
    vs = [v for v in values if v is not None]
    return sum(vs) / len(vs) if vs else None


@dataclass
class AxisWidths:
    """The trainable-width analysis of one grid axis of a run (built by :func:`axis_widths`).

    Attributes:
        axis: the grid axis (e.g. ``"train.lr"``).
        grid: its values, sorted.
        finals: ``{arm: {seed: {value: final accuracy}}}``, ``None`` for a job that diverged.
        plotted: the same with a diverged job's final accuracy kept, as the "grid" figure draws it.
        threshold: the accuracy a grid point must reach to train (``fraction`` x ``best_mean``).
        best_mean: the best mean-over-seeds final accuracy of any arm at any grid point.
        ranges: ``{arm: {seed: TrainableRange}}``.
        diverged: ``{arm: {value: seeds that diverged there}}``.
    """

    axis: str
    grid: list[float]
    fraction: float
    finals: dict[str, dict[Any, dict[float, float | None]]]
    plotted: dict[str, dict[Any, dict[float, float | None]]]
    threshold: float | None
    best_mean: float | None
    ranges: dict[str, dict[Any, TrainableRange]]
    diverged: dict[str, dict[float, int]]

    @property
    def arms(self) -> list[str]:
        return list(self.finals)

    def seeds(self, *arms: str) -> list[Any]:
        """The seeds every one of ``arms`` has jobs for (sorted)."""
        if not arms or any(a not in self.finals for a in arms):
            return []
        return sorted(set.intersection(*(set(self.finals[a]) for a in arms)))

    def widths(self, arm: str) -> list[float]:
        return [r.width for _, r in sorted(self.ranges.get(arm, {}).items())]

    def differences(self, arm: str, base: str) -> list[float]:
        """Per seed (both arms present): width(arm) - width(base)."""
        if arm not in self.ranges or base not in self.ranges:
            return []
        return [self.ranges[arm][s].width - self.ranges[base][s].width for s in self.seeds(arm, base)]

    def censored(self, arm: str) -> list[Any]:
        """Seeds whose trainable range for ``arm`` reaches an end of the grid."""
        return [s for s, r in sorted(self.ranges.get(arm, {}).items()) if r.censored]

    def lower_bound(self, arm: str, base: str) -> bool:
        """``arm``'s range reaches an end of the grid where ``base``'s does not, in some seed: the
        difference ``arm - base`` may understate the true one (the grid cut ``arm``'s range short)."""
        if arm not in self.ranges or base not in self.ranges:
            return False
        a, b = self.ranges[arm], self.ranges[base]
        return any((a[s].at_high_edge and not b[s].at_high_edge) or (a[s].at_low_edge and not b[s].at_low_edge)
                   for s in self.seeds(arm, base))

    def best(self, arm: str) -> float | None:
        """The grid value with ``arm``'s best mean final accuracy (every seed must have a value there)."""
        return best_value(mean_by_value(self.finals.get(arm, {})))

    def plotted_means(self, arm: str) -> dict[float, float | None]:
        """Mean over seeds of the plotted final values (diverged jobs included), as the figure's line."""
        per_seed = self.plotted.get(arm, {})
        return {x: _mean_present(by.get(x) for by in per_seed.values()) for x in self.grid}

    def range_text(self, arm: str) -> str:
        """The rates (values) that train in at least one seed, ``"0.01 .. 3.16"``, or ``"none"``."""
        lows = [r.low for r in self.ranges.get(arm, {}).values() if r.low is not None]
        highs = [r.high for r in self.ranges.get(arm, {}).values() if r.high is not None]
        return f"{fmt_value(min(lows))} .. {fmt_value(max(highs))}" if lows else "none"

    def accuracy_note(self, arm: str, what: str) -> str:
        """One line: ``arm``'s mean final accuracy at each grid value, and how many seeds diverged there."""
        n = len(self.plotted.get(arm, {}))
        parts = []
        for x, v in self.plotted_means(arm).items():
            div = self.diverged.get(arm, {}).get(x, 0)
            parts.append(f"{fmt_value(x)}: " + (f"{v:.3f}" if v is not None else "n/a")
                         + (f" ({div}/{n} diverged)" if div else ""))
        return f"Mean final test accuracy of {arm!r} by {what}: " + ", ".join(parts) + "."

    def figure_note(self, arm: str, figure: str) -> str:
        """What the accuracy-vs-axis figure's line for ``arm`` shows, in words."""
        if self.threshold is None:
            return ""
        means = self.plotted_means(arm)
        above = [x for x in self.grid if means.get(x) is not None and means[x] >= self.threshold]
        below = [x for x in self.grid if means.get(x) is not None and means[x] < self.threshold]
        text = (f"{figure}, {arm!r}: the mean line is at or above the bar ({self.threshold:.3f}) "
                + (f"from {fmt_value(above[0])} to {fmt_value(above[-1])}" if above else "nowhere"))
        if below:
            lowest = min(below, key=lambda x: means[x])
            text += (f" and below it at {', '.join(map(fmt_value, below))} (lowest {means[lowest]:.3f}, at "
                     f"{fmt_value(lowest)})")
        div = {x: c for x, c in self.diverged.get(arm, {}).items() if c}
        text += ("; runs diverged (loss NaN/inf) at " + ", ".join(
            f"{fmt_value(x)} ({c}/{len(self.plotted.get(arm, {}))})" for x, c in sorted(div.items()))
                 if div else "; no run diverged")
        return text + "."


def axis_widths(rows: Iterable[dict[str, Any]], axis: str, fraction: float, *, grid: Iterable[float] | None = None,
                log: bool = True, key: str = "test_acc") -> AxisWidths:
    """The trainable-width analysis of grid axis ``axis`` (see the module docstring): every arm's
    final accuracy per seed and value, one threshold (``fraction`` x the best mean), and each
    (arm, seed)'s :class:`TrainableRange`. ``grid``: the axis's values (default: those in the rows)."""
    rows = list(rows)
    finals = axis_finals(rows, axis, key)
    plotted = axis_finals(rows, axis, key, keep_diverged=True)
    values = sorted(set(grid) if grid is not None else
                    {x for per_seed in plotted.values() for by in per_seed.values() for x in by})
    threshold = fraction_threshold(finals, fraction)
    ranges = {arm: {s: trainable_range(by, threshold, log=log, grid=values) for s, by in per_seed.items()}
              for arm, per_seed in finals.items()} if threshold is not None else {}
    div: dict[str, dict[float, int]] = {arm: {x: 0 for x in values} for arm in finals}
    for job, job_rows in group_jobs(rows).items():
        x = dict(job.point).get(axis)
        if job.arm in div and x in div[job.arm] and diverged(job_rows):
            div[job.arm][x] += 1
    return AxisWidths(axis, values, fraction, finals, plotted, threshold,
                      threshold / fraction if threshold is not None and fraction else None, ranges, div)


def censor_notes(ax: AxisWidths, arm: str, base: str, grid_name: str) -> list[str]:
    """Notes for trainable ranges cut short by an end of the grid, and what that does to the
    difference ``arm - base`` (understated when ``arm``'s range is cut, overstated when ``base``'s is)."""
    notes = []
    for who, effect in ((arm, "understated"), (base, "overstated")):
        censored = ax.censored(who)
        if censored:
            other = base if who == arm else arm
            notes.append(f"The trainable range of {who!r} reached an end of the {grid_name} in {len(censored)} of "
                         f"{len(ax.ranges[who])} seeds: it may go on beyond the grid, so its width is a lower bound"
                         + (f" and the difference {arm} - {base} may be {effect}." if ax.lower_bound(who, other)
                            else f"; {other!r} reaches the same end in those seeds, so the difference is "
                                 "measured within the grid."))
    return notes


def curve_note(rows: Iterable[dict[str, Any]], axis: str, value: Any, title: str, key: str = "test_acc") -> str:
    """What a "curve" figure filtered to ``axis == value`` shows, in words: each arm's mean final
    ``key`` there, and its runs that diverged (their lines stop early)."""
    by_arm: dict[str, list[list[dict[str, Any]]]] = {}
    for job, job_rows in group_jobs(rows).items():
        if dict(job.point).get(axis) == value:
            by_arm.setdefault(job.arm, []).append(job_rows)
    if not by_arm:
        return f"Figure \"{title}\": no run at {axis} = {fmt_value(value)} in this grid, so it is empty."
    parts = []
    for arm, jobs in by_arm.items():
        stops = [rs[-1]["step"] for rs in jobs if diverged(rs)]
        ends = [v for rs in jobs if not diverged(rs) and (v := final(rs, key)) is not None]
        text = f"{arm!r} " + (f"ends at {sum(ends) / len(ends):.3f} (mean of {len(ends)} runs)" if ends else "")
        if stops:
            span = f"{min(stops)}" + (f" to {max(stops)}" if max(stops) != min(stops) else "")
            text += ", and " if ends else ""
            text += f"{len(stops)} of {len(jobs)} runs diverged (lines stop at step {span})"
        parts.append(text)
    return f"Figure \"{title}\": " + "; ".join(parts) + "."
