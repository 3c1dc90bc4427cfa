"""The report (HTML + Markdown) of a run, its figures drawn by :mod:`normlab.lab.figures`, built from its ``config.json`` and ``metrics.jsonl`` alone.

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
import json
import re
import shlex
from pathlib import Path
from typing import Any


from .experiments.base import Experiment, Summary
from .figures import arms_of, figure_png, plot_figure, seeds_of
from .experiments.registry import get_experiment
from .rows import value as _value
from .runfiles import atomic_write_bytes, atomic_write_text, read_jsonl

__all__ = ["load_run", "plot_figure", "write_report", "format_summary_table"]


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

    arms = arms_of(rows)
    figures = []  # (spec, file name, png bytes)
    for i, spec in enumerate(experiment.figures, start=1):
        figures.append((spec, f"fig{i}-{_slug(spec.title or spec.metric or spec.probe)}.png", figure_png(plot_figure(spec, rows, arms=arms))))

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
        ("seeds", ", ".join(str(s) for s in seeds_of(rows)) if rows else "none recorded"),
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
