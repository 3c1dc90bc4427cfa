"""Plots and the report (HTML + Markdown) of a run, built from its ``config.json`` and ``metrics.jsonl`` alone.

A run folder holds the resolved ``config.json`` and ``metrics.jsonl`` (one JSON object per
evaluation, arms and seeds interleaved). :func:`write_report` reads them, asks the experiment to
:meth:`~normlab.lab.experiments.base.Experiment.summarize` the rows, draws the experiment's
figures (:class:`~normlab.lab.experiments.base.FigureSpec`) and writes, atomically:

* ``summary.json``: the :class:`~normlab.lab.experiments.base.Summary` as a dict;
* ``report.html``: self-contained (figures inlined as base64 PNG, inline CSS, nothing fetched);
* ``report.md`` with the figures as PNG files in ``figures/``.

Both reports put the summary first (verdict, headline, expected outcome, table, published
anchors, notes), then the figures, then the run (arms, seeds, steps, resolved config, and the
command that rebuilds the report). Nothing in them depends on the time of the build, so
rebuilding gives the same files.

Example::

    >>> from normlab.lab.report import write_report, format_summary_table  # doctest: +SKIP
    >>> paths = write_report("runs/ioffe2015_mnist-quick")                 # doctest: +SKIP
    >>> paths["html"]                                                      # doctest: +SKIP
    PosixPath('runs/ioffe2015_mnist-quick/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
import shlex
from pathlib import Path
from typing import Any, Iterable

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

from .experiments.base import Experiment, FigureSpec, Summary
from .experiments.registry import get_experiment
from .rows import best, final, group_jobs
from .rows import value as _value
from .runfiles import atomic_write_bytes, atomic_write_text, read_jsonl

__all__ = ["load_run", "plot_figure", "write_report", "format_summary_table"]

FIGURE_KINDS = ("curve", "percentiles", "grid", "profile")
PERCENTILES = (15, 50, 85)

# Matplotlib's "tab10" colours, written out so an arm's colour does not depend on rcParams/style.
_PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)
_DPI = 110


# ----------------------------------------------------------------------------------------------
# Loading


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's resolved config and its metrics rows, in file order.

    Raises a ``ValueError`` that names the path when the folder, ``config.json`` or
    ``metrics.jsonl`` is missing, when ``config.json`` is not a JSON object, or when a line of
    ``metrics.jsonl`` is not a JSON object (naming the line). An unreadable *last* line is the
    torn tail of an interrupted append: it is skipped with a ``UserWarning``. Blank lines are ignored.
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ValueError(f"run folder {str(run)!r} does not exist or is not a folder; pass the folder a `normlab run` wrote.")
    config_path, metrics_path = run / "config.json", run / "metrics.jsonl"
    for path in (config_path, metrics_path):
        if not path.is_file():
            raise ValueError(
                f"{path} is missing: a run folder holds config.json and metrics.jsonl "
                f"(found: {sorted(p.name for p in run.iterdir()) or 'nothing'})."
            )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object, got {type(config).__name__}.")

    rows = read_jsonl(metrics_path)
    return config, rows


# ----------------------------------------------------------------------------------------------
# Aggregation helpers


def _arms(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Arm names in order of first appearance (the trainer writes them in config order)."""
    return list(dict.fromkeys(str(row.get("arm")) for row in rows))


def _seeds(rows: Iterable[dict[str, Any]]) -> list[Any]:
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
    arms = list(arms) if arms is not None else _arms(rows)
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
    if spec.kind == "profile":
        if spec.reduce not in ("first", "final"):
            raise ValueError(f"profile figure {spec.title!r}: reduce must be 'first' or 'final', got {spec.reduce!r}.")
        return _plot_profile(spec, rows, arms)
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
        if logx:
            ax.set_xscale("log")
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


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Summary as text


def format_summary_table(summary: Summary) -> str:
    """The summary as plain text for the terminal: claim, verdict, headline, the table, anchors, notes."""
    met = "expected outcome met" if summary.met else "expected outcome NOT met"
    lines = [summary.claim, f"verdict: {summary.verdict} ({met})", summary.headline, ""]
    lines += _text_table(summary.columns, summary.rows)
    lines += ["", f"expected: {summary.expected}"]
    lines += [f"published: {line}" for line in summary.published]
    lines += [f"note: {line}" for line in summary.notes]
    return "\n".join(lines)


def _text_table(columns: list[str], rows: list[list[str]]) -> list[str]:
    width = max([len(columns), *(len(r) for r in rows)], default=0)
    cells = [[str(c) for c in columns] + [""] * (width - len(columns))]
    cells += [[str(c) for c in row] + [""] * (width - len(row)) for row in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(width)]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return [fmt(cells[0]), "  ".join("-" * w for w in widths), *(fmt(r) for r in cells[1:])]


# ----------------------------------------------------------------------------------------------
# The report


def write_report(run_dir: str | Path, *, experiment: Experiment | None = None) -> dict[str, Path]:
    """Build ``report.html``, ``report.md`` (+ ``figures/*.png``) and ``summary.json`` in ``run_dir``.

    Reads only ``config.json`` and ``metrics.jsonl`` (:func:`load_run`). ``experiment`` defaults
    to ``get_experiment(config["experiment"])``. Every file is written atomically. Returns the
    paths ``{"html": ..., "md": ..., "summary": ...}``.
    """
    run = Path(run_dir)
    config, rows = load_run(run)
    if experiment is None:
        if "experiment" not in config:
            raise ValueError(f"{run / 'config.json'} has no 'experiment' key; pass experiment= or rebuild from a folder `normlab run` wrote.")
        experiment = get_experiment(config["experiment"])
    summary = experiment.summarize(rows, config)
    if not isinstance(summary, Summary):
        raise TypeError(f"{type(experiment).__name__}.summarize must return a Summary, got {type(summary).__name__}.")

    arms = _arms(rows)
    figures = []  # (spec, file name, png bytes)
    for i, spec in enumerate(experiment.figures, start=1):
        figures.append((spec, f"fig{i}-{_slug(spec.title or spec.metric or spec.probe)}.png", _png(plot_figure(spec, rows, arms=arms))))

    facts = _run_facts(config, rows, arms, experiment)
    command = f"normlab report {shlex.quote(str(run))}"
    paths = {"html": run / "report.html", "md": run / "report.md", "summary": run / "summary.json"}

    for _, name, png in figures:
        atomic_write_bytes(run / "figures" / name, png)
    atomic_write_text(paths["summary"], json.dumps(summary.to_dict(), indent=2, default=_json_default) + "\n")
    atomic_write_text(paths["md"], _markdown(experiment, summary, figures, facts, config, command))
    atomic_write_text(paths["html"], _html(experiment, summary, figures, facts, config, command))
    return paths


def _json_default(value: Any) -> Any:
    item = getattr(value, "item", None)  # NumPy / torch scalars
    return item() if callable(item) else str(value)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48] or "figure"


def _run_facts(config: dict[str, Any], rows: list[dict[str, Any]], arms: list[str], experiment: Experiment) -> list[tuple[str, str]]:
    """(label, value) pairs describing the run, in plain text."""
    steps = sorted({row["step"] for row in rows if isinstance(row.get("step"), (int, float))})
    evals: dict[tuple[Any, Any], set] = {}
    wall: dict[tuple[Any, Any], float] = {}
    for row in rows:
        key = (row.get("arm"), row.get("seed"))
        evals.setdefault(key, set()).add(row.get("step"))
        t = _value(row, "wall_time")
        if t is not None:
            wall[key] = max(wall.get(key, 0.0), t)
    counts = sorted({len(s) for s in evals.values()})
    facts = [
        ("experiment", str(config.get("experiment", getattr(experiment, "name", "")) or "?")),
        ("arms", ", ".join(arms) if arms else "none recorded"),
        ("seeds", ", ".join(str(s) for s in _seeds(rows)) if rows else "none recorded"),
    ]
    if steps:
        per = str(counts[0]) if len(counts) == 1 else f"{counts[0]} to {counts[-1]}"
        facts.append(("steps", f"{steps[0]:g} to {steps[-1]:g} ({per} evaluations per arm and seed)"))
    else:
        facts.append(("steps", "no evaluations recorded"))
    if wall:
        facts.append(("training time", f"{sum(wall.values()):.1f} s over {len(wall)} arm/seed runs"))
    facts.append(("metrics rows", str(len(rows))))
    return facts


# ---- Markdown


def _md(text: Any) -> str:
    """Plain text for Markdown: HTML-looking '<', '>' shown literally, one line."""
    return re.sub(r"([<>])", r"\\\1", str(text)).replace("\n", " ")


def _md_cell(text: Any) -> str:
    return _md(text).replace("|", r"\|")


def _fence(text: str, info: str = "") -> str:
    ticks = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", text)), default=0))
    return f"{ticks}{info}\n{text}\n{ticks}"


def _markdown(experiment, summary, figures, facts, config, command) -> str:
    out = [f"# {_md(experiment.title or summary.experiment)}", "", f"**Claim:** {_md(summary.claim or experiment.claim)}", ""]
    out += ["## Summary", "", f"**Verdict: {_md(summary.verdict)}.** {_md(summary.headline)}", ""]
    out += [f"**Expected outcome:** {_md(summary.expected)} — **{'met' if summary.met else 'not met'}**.", ""]
    if summary.columns or summary.rows:
        width = max([len(summary.columns), *(len(r) for r in summary.rows)])
        header = list(summary.columns) + [""] * (width - len(summary.columns))
        out.append("| " + " | ".join(_md_cell(c) for c in header) + " |")
        out.append("|" + "---|" * width)
        for row in summary.rows:
            out.append("| " + " | ".join(_md_cell(c) for c in list(row) + [""] * (width - len(row))) + " |")
        out.append("")
    if summary.published:
        out += ["**Published anchors:**", "", *(f"- {_md(line)}" for line in summary.published), ""]
    if summary.notes:
        out += ["**Notes:**", "", *(f"- {_md(line)}" for line in summary.notes), ""]
    if figures:
        out += ["## Figures", ""]
        for spec, name, _ in figures:
            out += [f"### {_md(spec.title)}", "", f"![{_md(spec.title)}](figures/{name})", ""]
            if spec.caption:
                out += [_md(spec.caption), ""]
    out += ["## Run", ""]
    if experiment.description:
        out += [_md(experiment.description), ""]
    out += [f"- **{label}:** {_md(value)}" for label, value in facts]
    out += ["", "Resolved config:", "", _fence(json.dumps(config, indent=2, default=_json_default), "json"), ""]
    out += ["Rebuild this report from the metrics:", "", _fence(command, "sh"), ""]
    return "\n".join(out)


# ---- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;margin:0;background:#fafafa}
main{max-width:980px;margin:0 auto;padding:1.5rem 1.25rem 3rem;background:#fff}
h1{font-size:1.6rem;margin:.2rem 0 .6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.claim{font-size:1.05rem;background:#f3f5f8;border-left:4px solid #8a9bb5;padding:.5rem .8rem}
.badge{display:inline-block;padding:.15rem .6rem;border-radius:1rem;font-weight:600;color:#fff;text-transform:uppercase;
  font-size:.85rem;letter-spacing:.03em;margin-right:.5rem;vertical-align:middle}
.v-supported{background:#2e7d32}.v-not-supported{background:#c62828}.v-mixed{background:#ef8f00}.v-other{background:#607d8b}
.met{font-weight:600}.met-yes{color:#2e7d32}.met-no{color:#c62828}
.side{display:flex;flex-wrap:wrap;gap:1.5rem;align-items:flex-start}.side>*{flex:1 1 300px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:.92rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left}th{background:#f3f5f8}
aside{background:#fbf8f0;border:1px solid #eadfc4;padding:.5rem .9rem;font-size:.92rem}aside h3{margin:.2rem 0}
figure{margin:1.5rem 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:.92rem;color:#333;margin-top:.3rem}
pre{background:#f6f8fa;padding:.7rem;overflow:auto;font-size:.85rem}code{font-family:ui-monospace,Menlo,Consolas,monospace}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.2rem 1rem}dt{font-weight:600}dd{margin:0}
""".strip()


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _verdict_class(verdict: str) -> str:
    slug = _slug(verdict)
    return f"v-{slug}" if slug in ("supported", "not-supported", "mixed") else "v-other"


def _html(experiment, summary, figures, facts, config, command) -> str:
    title = experiment.title or summary.experiment
    out = [
        "<!doctype html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_h(title)}</title>",
        f"<style>\n{_CSS}\n</style>",
        "</head>",
        "<body>",
        "<main>",
        f"<h1>{_h(title)}</h1>",
        f'<p class="claim"><strong>Claim:</strong> {_h(summary.claim or experiment.claim)}</p>',
        '<section id="summary">',
        "<h2>Summary</h2>",
        f'<p><span class="badge {_verdict_class(summary.verdict)}">{_h(summary.verdict)}</span>{_h(summary.headline)}</p>',
        f'<p><strong>Expected outcome:</strong> {_h(summary.expected)} — '
        f'<span class="met {"met-yes" if summary.met else "met-no"}">{"met" if summary.met else "not met"}</span></p>',
        '<div class="side">',
    ]
    if summary.columns or summary.rows:
        out += ["<div>", "<table>", "<thead><tr>" + "".join(f"<th>{_h(c)}</th>" for c in summary.columns) + "</tr></thead>", "<tbody>"]
        out += ["<tr>" + "".join(f"<td>{_h(c)}</td>" for c in row) + "</tr>" for row in summary.rows]
        out += ["</tbody>", "</table>", "</div>"]
    if summary.published:
        out += ["<aside>", "<h3>Published</h3>", "<ul>", *(f"<li>{_h(line)}</li>" for line in summary.published), "</ul>", "</aside>"]
    out.append("</div>")
    if summary.notes:
        out += ["<h3>Notes</h3>", "<ul>", *(f"<li>{_h(line)}</li>" for line in summary.notes), "</ul>"]
    out.append("</section>")
    if figures:
        out += ['<section id="figures">', "<h2>Figures</h2>"]
        for spec, _, png in figures:
            data = base64.b64encode(png).decode("ascii")
            caption = f"<strong>{_h(spec.title)}.</strong>" + (f" {_h(spec.caption)}" if spec.caption else "")
            out += ["<figure>", f'<img src="data:image/png;base64,{data}" alt="{_h(spec.title)}">', f"<figcaption>{caption}</figcaption>", "</figure>"]
        out.append("</section>")
    out += ['<section id="run">', "<h2>Run</h2>"]
    if experiment.description:
        out.append(f"<p>{_h(experiment.description)}</p>")
    out += ["<dl>", *(f"<dt>{_h(label)}</dt><dd>{_h(value)}</dd>" for label, value in facts), "</dl>"]
    out += [
        "<details>",
        "<summary>Resolved config (config.json)</summary>",
        f"<pre><code>{_h(json.dumps(config, indent=2, default=_json_default))}</code></pre>",
        "</details>",
        f"<p>Rebuild this report from the metrics: <code>{_h(command)}</code></p>",
        "</section>",
        "</main>",
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(out)
