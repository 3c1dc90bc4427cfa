"""The figures of a run's report: one matplotlib Figure per :class:`~normlab.lab.experiments.base.FigureSpec`.

Kinds (``FigureSpec.kind``): ``curve`` (a metric against steps, one line per arm, band over
seeds), ``percentiles`` (a probe's 15th/50th/85th percentiles against steps), ``grid`` (a per-job
statistic against a grid axis, band over seeds, log x for numeric axes spanning more than 20x,
text axes as points with error bars) and ``profile`` (per-layer probe values against depth).
``where`` filters rows and ``panel`` draws one panel per value of a grid axis, for every kind.
Arms keep their colour across figures; nothing depends on matplotlib's global state.
"""

from __future__ import annotations

import io
import re
import math
from typing import Any, Iterable

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from .experiments.base import FigureSpec
from .rows import best, final, group_jobs
from .rows import value as _value

__all__ = ["FIGURE_KINDS", "PERCENTILES", "arms_of", "figure_png", "plot_figure", "seeds_of"]

FIGURE_KINDS = ("curve", "percentiles", "grid", "profile", "series")
PERCENTILES = (15, 50, 85)

# Matplotlib's "tab10" colours, written out so an arm's colour does not depend on rcParams/style.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
_DPI = 110


# ----------------------------------------------------------------------------------------------
# Aggregation helpers


def arms_of(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Arm names in order of first appearance (the trainer writes them in config order)."""
    return list(dict.fromkeys(str(row.get("arm")) for row in rows))


def seeds_of(rows: Iterable[dict[str, Any]]) -> list[Any]:
    return sorted({row.get("seed") for row in rows}, key=lambda s: (not isinstance(s, (int, float)), s if isinstance(s, (int, float)) else str(s)))


def _by_step(rows: list[dict[str, Any]], arm: str, key: str) -> tuple[list[float], list[list[float]]]:
    """Steps (sorted) and, per step, the values over seeds of ``key`` for ``arm`` (rows of one
    grid point). A step logged twice for one seed (a resumed run) counts once: the later row wins.
    """
    latest: dict[tuple[Any, Any], float | None] = {}
    for row in rows:
        if str(row.get("arm")) == arm and "step" in row:
            latest[(row.get("seed"), row["step"])] = _value(row, key)
    per_step: dict[Any, list[float]] = {}
    for (_, step), v in latest.items():
        if v is not None:
            per_step.setdefault(step, []).append(v)
    steps = sorted(per_step)
    return steps, [per_step[s] for s in steps]


def _colour(arms: list[str], arm: str) -> str:
    return _PALETTE[arms.index(arm) % len(_PALETTE)]


def _sort_key(value: Any) -> tuple:
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _axes_of(rows: list[dict[str, Any]]) -> list[str]:
    """The grid axes present in the rows, in the order of the points' keys."""
    return list(dict.fromkeys(axis for row in rows for axis in (row.get("point") or {})))


def _where(rows: list[dict[str, Any]], where: Iterable[tuple[str, Any]]) -> list[dict[str, Any]]:
    conditions = list(where)
    return [r for r in rows if all((r.get("point") or {}).get(axis) == v for axis, v in conditions)]


def _panels(spec: FigureSpec, rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(panel title, rows)]``: one panel per value of ``spec.panel`` (or one panel of all rows)."""
    rows = _where(rows, spec.where)
    if not spec.panel:
        return [("", rows)]
    values = sorted({(r.get("point") or {}).get(spec.panel) for r in rows} - {None}, key=_sort_key)
    return [(f"{_short(spec.panel)} = {_fmt(v)}", [r for r in rows if (r.get("point") or {}).get(spec.panel) == v])
            for v in values] or [("", [])]


def _series(rows: list[dict[str, Any]], arms: list[str], skip: Iterable[str]) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """``[(label, arm, rows)]``: one series per arm and value of every grid axis not in ``skip``
    (so a line never mixes grid points)."""
    free = [axis for axis in _axes_of(rows) if axis not in set(skip)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        point = row.get("point") or {}
        groups.setdefault((str(row.get("arm")), tuple(point.get(a) for a in free)), []).append(row)
    out = []
    for (arm, values) in sorted(groups, key=lambda k: (arms.index(k[0]) if k[0] in arms else len(arms),
                                                       [_sort_key(v) for v in k[1]])):
        label = arm + "".join(f", {_short(a)}={_fmt(v)}" for a, v in zip(free, values))
        out.append((label, arm, groups[(arm, values)]))
    return out


def _styles(series: list[tuple[str, str, list]], arms: list[str]) -> list[tuple[str, str]]:
    """(colour, line style) per series: the arm's colour; dashes tell an arm's grid points apart."""
    dashes, seen, out = ("-", "--", ":", "-."), {}, []
    for _, arm, _ in series:
        k = seen[arm] = seen.get(arm, -1) + 1
        out.append((_colour(arms, arm) if arm in arms else _PALETTE[-1], dashes[k % len(dashes)]))
    return out


def _subplots(spec: FigureSpec, count: int, *, sharey: bool = True):
    fig = Figure(figsize=(0.6 + 4.6 * max(count, 1) if count > 1 else 6.4, 4.0), layout="constrained")
    axes = fig.subplots(1, max(count, 1), sharey=sharey, squeeze=False)[0]
    if count > 1:
        fig.suptitle(spec.title)
    else:
        axes[0].set_title(spec.title)
    return fig, axes


# ----------------------------------------------------------------------------------------------
# Plots


def plot_figure(spec: FigureSpec, rows: list[dict[str, Any]], *, arms: list[str] | None = None) -> Figure:
    """Draw one :class:`FigureSpec` from metrics rows; returns a (pyplot-free) matplotlib ``Figure``.

    ``"curve"``: ``spec.metric`` against step, per arm the mean over seeds as a line and the
    seeds' min..max as a band; log y axis if ``spec.logy``. ``"percentiles"``: one panel per arm
    (shared y axis) with the seed-averaged ``{probe}_p15/_p50/_p85``, the 50th solid, the others
    dashed, the band between them shaded. ``"grid"``: a per-job statistic against a grid axis.
    ``"profile"``: per-layer probe values against depth. With a grid, a line never mixes grid
    points: each arm gets one line per value of the axes not on the x axis or in ``panel``.
    Null and non-finite values are skipped (divergence is the summary's business). ``arms``
    fixes the order and hence the colours (default: order of first appearance in ``rows``, the
    same for every figure of a run).
    """
    if spec.kind not in FIGURE_KINDS:
        raise ValueError(f"unknown figure kind {spec.kind!r} in figure {spec.title!r}; valid kinds are {list(FIGURE_KINDS)}.")
    arms = list(arms) if arms is not None else arms_of(rows)
    if spec.kind in ("curve", "grid") and not spec.metric:
        raise ValueError(f"{spec.kind} figure {spec.title!r} needs FigureSpec.metric (a key of the metrics rows, e.g. 'test_acc').")
    if spec.kind == "curve":
        return _plot_curve(spec, rows, arms)
    if spec.kind == "grid":
        if not spec.axis:
            raise ValueError(f"grid figure {spec.title!r} needs FigureSpec.axis (a grid axis, e.g. 'train.lr').")
        if spec.reduce not in _REDUCERS:
            raise ValueError(f"grid figure {spec.title!r}: reduce must be one of {sorted(_REDUCERS)}, got {spec.reduce!r}.")
        return _plot_grid(spec, rows, arms)
    if not spec.probe:
        raise ValueError(f"{spec.kind} figure {spec.title!r} needs FigureSpec.probe (the probe's value prefix).")
    if spec.kind in ("profile", "series"):
        if spec.reduce not in ("first", "final"):
            raise ValueError(f"{spec.kind} figure {spec.title!r}: reduce must be 'first' or 'final', got {spec.reduce!r}.")
        return _plot_profile(spec, rows, arms) if spec.kind == "profile" else _plot_series(spec, rows, arms)
    return _plot_percentiles(spec, rows, arms)


def _band(ax, x, values, colour, style, label) -> None:
    ax.plot(x, [sum(v) / len(v) for v in values], color=colour, ls=style, lw=1.8, label=label, marker="o" if len(x) < 12 else None, ms=3)
    ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=colour, alpha=0.15, lw=0)


def _finish(ax, spec: FigureSpec, drawn: bool, xlabel: str, what: str, first: bool) -> None:
    ax.set_xlabel(xlabel)
    if first:
        ax.set_ylabel(spec.ylabel or spec.metric or spec.probe)
    ax.grid(True, alpha=0.3)
    if spec.logy and drawn:
        ax.set_yscale("log")
    if drawn:
        ax.legend(title="mean over seeds; band: min..max", fontsize="small", title_fontsize="small")
    else:
        _no_data(ax, f"no values of {what} in the metrics")


def _plot_lines(spec: FigureSpec, rows: list[dict[str, Any]], arms: list[str], points, xlabel: str,
                what: str) -> Figure:
    """One panel per ``spec.panel`` value, one line per series: ``points(series_rows, arm)`` gives
    the x values and, per x, the values over seeds (mean drawn, min..max as a band)."""
    panels = _panels(spec, rows)
    fig, axes = _subplots(spec, len(panels))
    for i, (ax, (title, panel_rows)) in enumerate(zip(axes, panels)):
        series = _series(panel_rows, arms, [spec.panel])
        drawn = False
        for (label, arm, series_rows), (colour, style) in zip(series, _styles(series, arms)):
            xs, values = points(series_rows, arm)
            if xs:
                _band(ax, xs, values, colour, style, label)
                drawn = True
        if title:
            ax.set_title(title, fontsize="medium")
        _finish(ax, spec, drawn, xlabel, what, i == 0)
    return fig


def _plot_curve(spec: FigureSpec, rows: list[dict[str, Any]], arms: list[str]) -> Figure:
    return _plot_lines(spec, rows, arms, lambda series_rows, arm: _by_step(series_rows, arm, spec.metric),
                       "step", repr(spec.metric))


def _job_values(job_rows: list[dict[str, Any]], key: str) -> list[float]:
    return [v for v in (_value(r, key) for r in job_rows) if v is not None]


_REDUCERS = {
    "final": final,
    "best": best,
    "min": lambda job_rows, key: min(_job_values(job_rows, key), default=None),
    "mean": lambda job_rows, key: (sum(vs) / len(vs)) if (vs := _job_values(job_rows, key)) else None,
}


def _plot_grid(spec: FigureSpec, rows: list[dict[str, Any]], arms: list[str]) -> Figure:
    panels = _panels(spec, rows)
    fig, axes = _subplots(spec, len(panels))
    reduce = _REDUCERS[spec.reduce]
    xs_all = {(r.get("point") or {}).get(spec.axis) for r in rows} - {None}
    numeric = bool(xs_all) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs_all)
    categories = sorted(xs_all, key=_sort_key)
    logx = spec.logx if spec.logx is not None else (
        numeric and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20)
    for i, (ax, (title, panel_rows)) in enumerate(zip(axes, panels)):
        series = _series(panel_rows, arms, [spec.axis, spec.panel])
        drawn = False
        for (label, arm, series_rows), (colour, style) in zip(series, _styles(series, arms)):
            per_x: dict[Any, list[float]] = {}
            for job, job_rows in group_jobs(series_rows).items():
                x, v = dict(job.point).get(spec.axis), reduce(job_rows, spec.metric)
                if x is not None and v is not None:
                    per_x.setdefault(x, []).append(v)
            xs = sorted(per_x, key=_sort_key)
            if xs and numeric:
                _band(ax, xs, [per_x[x] for x in xs], colour, style, label)
            elif xs:  # categories: no line between them (it would mean nothing), the seeds' range as a bar
                shift = 0.08 * (len(series) - 1) * (series.index((label, arm, series_rows)) / max(len(series) - 1, 1) - 0.5)
                at = [categories.index(x) + shift for x in xs]
                means = [sum(per_x[x]) / len(per_x[x]) for x in xs]
                ax.errorbar(at, means, yerr=[[m - min(per_x[x]) for m, x in zip(means, xs)],
                                             [max(per_x[x]) - m for m, x in zip(means, xs)]],
                            color=colour, ls="none", marker="o", ms=5, capsize=4, label=label)
            drawn = drawn or bool(xs)
        for x, mark in spec.marks:
            ax.axvline(x, color="0.5", lw=0.8, ls=":")
            ax.annotate(mark, (x, 1.0), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize="x-small", color="0.35")
        for y, level in spec.levels:
            ax.axhline(y, color="0.5", lw=0.8, ls="--")
            ax.annotate(level, (0.0, y), xycoords=("axes fraction", "data"), va="bottom", ha="left",
                        fontsize="x-small", color="0.35")
        if logx:
            ax.set_xscale("log")
            if len(set(xs_all)) <= 12:  # ticks at the grid's values, plainly labelled (2, 8, 32; not 2x10^0)
                ticks = sorted(set(xs_all))
                ax.set_xticks(ticks, [_fmt(t) for t in ticks])
                ax.minorticks_off()
        if not numeric and categories:
            ax.set_xticks(range(len(categories)), [_fmt(c) for c in categories])
            ax.set_xlim(-0.5, len(categories) - 0.5)
        if title:
            ax.set_title(title, fontsize="medium")
        _finish(ax, spec, drawn, _short(spec.axis) if spec.axis else "", f"{spec.metric!r} per {spec.axis!r}", i == 0)
    return fig


def _profile_of(job_rows: list[dict[str, Any]], probe: str, which: str) -> dict[int, float]:
    pattern = re.compile(rf"^{re.escape(probe)}_(\d+)$")
    ordered = job_rows if which == "first" else list(reversed(job_rows))
    for row in ordered:
        values = {int(m.group(1)): v for key, v in (row.get("probes") or {}).items()
                  if (m := pattern.match(key)) and isinstance(v, (int, float)) and math.isfinite(v)}
        if values:
            return values
    return {}


def _plot_profile(spec: FigureSpec, rows: list[dict[str, Any]], arms: list[str]) -> Figure:
    def points(series_rows, arm):
        per_depth: dict[int, list[float]] = {}
        for job_rows in group_jobs(series_rows).values():
            for depth, v in _profile_of(job_rows, spec.probe, spec.reduce).items():
                per_depth.setdefault(depth, []).append(v)
        depths = sorted(per_depth)
        return depths, [per_depth[d] for d in depths]

    return _plot_lines(spec, rows, arms, points, "layer (1 = first)", f"'{spec.probe}_1', '{spec.probe}_2', ...")


def _series_of(job_rows: list[dict[str, Any]], probe: str, which: str) -> dict[str, dict[float, float]]:
    """``{line: {x: value}}`` from the probe keys ``{probe}:{line}:{x}`` (numeric x) of the job's
    first or last row that has any."""
    pattern = re.compile(rf"^{re.escape(probe)}:(.+):([^:]+)$")
    ordered = job_rows if which == "first" else list(reversed(job_rows))
    for row in ordered:
        found: dict[str, dict[float, float]] = {}
        for key, v in (row.get("probes") or {}).items():
            m = pattern.match(key)
            if m and isinstance(v, (int, float)) and math.isfinite(v):
                try:
                    x = float(m.group(2))
                except ValueError:
                    continue
                found.setdefault(m.group(1), {})[x] = v
        if found:
            return found
    return {}


def _plot_series(spec: FigureSpec, rows: list[dict[str, Any]], arms: list[str]) -> Figure:
    """One line per name ``line`` of the probe keys ``{probe}:{line}:{x}`` (per arm when there are
    several), against x; mean over seeds, band min..max; colours by line, in order of appearance."""
    panels = _panels(spec, rows)
    fig, axes = _subplots(spec, len(panels))
    for i, (ax, (title, panel_rows)) in enumerate(zip(axes, panels)):
        lines: dict[tuple[str, str], dict[float, list[float]]] = {}
        for job, job_rows in group_jobs(panel_rows).items():
            for line, values in _series_of(job_rows, spec.probe, spec.reduce).items():
                for x, v in values.items():
                    lines.setdefault((job.arm, line), {}).setdefault(x, []).append(v)
        names = list(dict.fromkeys(line for _, line in lines))
        several = len({arm for arm, _ in lines}) > 1
        for (arm, line), per_x in lines.items():
            xs = sorted(per_x)
            colour = _PALETTE[names.index(line) % len(_PALETTE)]
            style = ("-", "--", ":", "-.")[(arms.index(arm) if arm in arms else 0) % 4] if several else "-"
            _band(ax, xs, [per_x[x] for x in xs], colour, style, f"{arm}, {line}" if several else line)
        if title:
            ax.set_title(title, fontsize="medium")
        _finish(ax, spec, bool(lines), spec.xlabel or "x", f"'{spec.probe}:<line>:<x>'", i == 0)
    return fig


def _plot_percentiles(spec: FigureSpec, rows: list[dict[str, Any]], arms: list[str]) -> Figure:
    keys = [f"{spec.probe}_p{p}" for p in PERCENTILES]
    panels = [arm for arm in arms if any(_by_step(rows, arm, key)[0] for key in keys)]
    fig = Figure(figsize=(0.5 + 3.6 * max(len(panels), 1), 3.8), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), sharey=True, squeeze=False)[0]
    fig.suptitle(spec.title)
    for i, ax in enumerate(axes):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        if i == 0:
            ax.set_ylabel(spec.ylabel or spec.probe)
    if not panels:
        _no_data(axes[0], f"no values of {', '.join(keys)} in the metrics' probes")
        return fig
    for ax, arm in zip(axes, panels):
        colour = _colour(arms, arm)
        curves = {}
        for p, key in zip(PERCENTILES, keys):
            steps, values = _by_step(rows, arm, key)
            curves[p] = (steps, [sum(v) / len(v) for v in values])
        lo, mid, hi = (curves[p] for p in PERCENTILES)
        if lo[0] and lo[0] == hi[0]:
            ax.fill_between(lo[0], lo[1], hi[1], color=colour, alpha=0.12, lw=0)
        ax.plot(*hi, color=colour, lw=1.2, ls="--", label=f"{PERCENTILES[2]}th percentile")
        ax.plot(*mid, color=colour, lw=1.8, ls="-", label=f"{PERCENTILES[1]}th percentile")
        ax.plot(*lo, color=colour, lw=1.2, ls="--", label=f"{PERCENTILES[0]}th percentile")
        ax.set_title(f"arm = {arm}", fontsize="medium")
    axes[0].legend(title="mean over seeds", fontsize="small", title_fontsize="small")
    return fig


def _no_data(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, color="0.4", wrap=True)


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()
