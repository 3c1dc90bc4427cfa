"""``normlab reproduce``: every experiment (or those testing chosen claims) into one suite folder,
with one index of claims and verdicts.

A suite folder holds ``suite.json`` (the experiments and the options they ran with), one run
folder per experiment (``NAME/``: the usual ``config.json``, ``metrics.jsonl``, report...), and
``index.html`` / ``index.md``: a short summary, then one row per claim (its id, the claim in
plain words, the experiments testing it, the measured statistic with its 95% CI, the verdict,
the published figure, a link to the report), then each experiment's headline and first figure.
All experiments' jobs share one pool of worker processes, so the cores stay busy to the end.
The index, like every report, is rebuilt from the metrics alone (:func:`write_index`).

Example::

    >>> from normlab.lab.suite import select_experiments
    >>> [e.name for e in select_experiments(claims=["C1"])]
    ['ioffe2015-mnist']
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from .claims import CLAIMS, claim_order
from .config import ConfigError, ExperimentConfig, apply_overrides, check_user_overrides
from .experiments import all_experiments
from .experiments.base import Experiment, Summary
from .runfiles import atomic_write_text
from .verdicts import Finding, combine

__all__ = ["SuiteOptions", "run_suite", "select_experiments", "write_index", "is_suite", "SUITE_FILE", "claim_findings",
           "suite_summaries"]

SUITE_FILE = "suite.json"


@dataclass
class SuiteOptions:
    """What ``normlab reproduce`` was asked for; saved in ``suite.json`` (a resumed suite must match)."""

    experiments: list[str]
    quick: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted keys applied to every experiment

    def config(self, experiment: Experiment) -> ExperimentConfig:
        base = experiment.quick_config() if self.quick else experiment.default_config()
        config = apply_overrides(base, self.overrides)
        given = {key: f"normlab reproduce's {key}={value}" for key, value in self.overrides.items()}
        check_user_overrides(config, given, experiment.derived)
        return config


def select_experiments(claims: Sequence[str] | None = None, names: Sequence[str] | None = None) -> list[Experiment]:
    """The experiments named, or testing any of the claims, or all; in name order.

    Raises:
        ValueError: an unknown claim id or experiment name (the message lists the valid ones), or
            a claim no experiment tests yet.
    """
    experiments = all_experiments()
    chosen = dict(experiments)
    if names:
        unknown = [n for n in names if n not in experiments]
        if unknown:
            raise ValueError(f"unknown experiment(s) {', '.join(unknown)}; valid experiments are {sorted(experiments)} "
                             f"(normlab list).")
        chosen = {n: experiments[n] for n in names}
    if claims:
        unknown = [c for c in claims if c not in CLAIMS]
        if unknown:
            raise ValueError(f"unknown claim(s) {', '.join(unknown)}; the claims are {', '.join(CLAIMS)}.")
        untested = [c for c in claims if not any(c in e.claims for e in experiments.values())]
        if untested:
            tested = sorted({c for e in experiments.values() for c in e.claims}, key=claim_order)
            raise ValueError(f"no experiment tests {', '.join(untested)} yet; claims with an experiment: "
                             f"{', '.join(tested)} (normlab list).")
        chosen = {n: e for n, e in chosen.items() if set(e.claims) & set(claims)}
    if not chosen:
        raise ValueError("no experiment matches both --claims and --experiments; see normlab list.")
    return [chosen[n] for n in sorted(chosen)]


def is_suite(folder: str | Path) -> bool:
    return (Path(folder) / SUITE_FILE).is_file()


def _load_options(folder: Path) -> SuiteOptions:
    try:
        data = json.loads((folder / SUITE_FILE).read_text(encoding="utf-8"))
        return SuiteOptions(list(data["experiments"]), bool(data["quick"]), dict(data.get("overrides", {})))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{folder / SUITE_FILE} is not a suite file written by normlab reproduce ({err}).") from None


def run_suite(
    out: str | Path,
    options: SuiteOptions,
    *,
    jobs: int,
    resume: bool = False,
    progress: bool = True,
    say: Callable[[str], None] = lambda line: None,
    executor: Any = None,
) -> list[Summary]:
    """Run the suite into ``out`` and write every report and the index; return the summaries.

    ``executor``: where the jobs run (default: ``jobs`` local worker processes).
    Each experiment's report is written as soon as its last job finishes; the index at the end
    (also when interrupted or failed, listing what is still missing).

    Raises:
        ConfigError: bad options, or ``resume`` with other options than the suite folder's.
        Interrupted, JobFailed: from the executor; finished jobs are kept for ``--resume``.
    """
    from .report import write_report
    from .trainer import Trainer, execute

    out = Path(out)
    saved = out / SUITE_FILE
    if saved.exists() and not resume:
        raise ConfigError(f"the folder {str(out)!r} already holds a suite; continue it with --resume or choose "
                          f"another --out.")
    if resume and saved.exists():
        old = _load_options(out)
        if (old.experiments, old.quick, old.overrides) != (options.experiments, options.quick, options.overrides):
            raise ConfigError(f"--resume: the suite in {str(out)!r} ran with other options ({json.dumps(old.__dict__)}); "
                              f"resume with the same ones or start a new --out.")
    experiments = all_experiments()
    runs = [Trainer(experiments[name], options.config(experiments[name]), out / name, resume=resume,
                    progress=progress, jobs=jobs, executor=executor)
            for name in options.experiments]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, json.dumps(options.__dict__, indent=2) + "\n")
    total = sum(len(run.jobs()) for run in runs)
    where = str(executor) if executor is not None else f"{jobs} worker process{'es' if jobs != 1 else ''}"
    say(f"normlab: reproduce: {len(runs)} experiments, {total} jobs, {where} -> {out}")

    def finished(run) -> None:
        write_report(run.paths.root, experiment=run.experiment)
        say(f"normlab: {run.experiment.name}: done (report: {run.paths.root / 'report.html'})")

    try:
        execute(runs, jobs=jobs, progress=progress, finished=finished, executor=executor)
    finally:
        write_index(out)
    return [_summary(out / name) for name in options.experiments]


def _summary(run_dir: Path) -> Summary:
    return Summary.from_dict(json.loads((run_dir / "summary.json").read_text(encoding="utf-8")))


# ----------------------------------------------------------------------------------------------
# The index


@dataclass
class _Entry:
    name: str
    experiment: Experiment
    summary: Summary | None  # None: not finished
    missing: int = 0  # unfinished jobs


def _entries(folder: Path, rebuild: bool) -> tuple[SuiteOptions, list[_Entry]]:
    from .report import write_report
    from .trainer import unfinished_jobs

    options = _load_options(folder)
    experiments = all_experiments()
    entries = []
    for name in options.experiments:
        run = folder / name
        if name not in experiments:
            raise ValueError(f"{folder / SUITE_FILE} names experiment {name!r}, which this normlab does not have.")
        if not (run / "config.json").is_file():
            entries.append(_Entry(name, experiments[name], None, -1))
            continue
        missing = len(unfinished_jobs(run))
        if missing:
            entries.append(_Entry(name, experiments[name], None, missing))
            continue
        if rebuild or not (run / "summary.json").is_file():
            write_report(run, experiment=experiments[name])
        entries.append(_Entry(name, experiments[name], _summary(run)))
    return options, entries


def write_index(folder: str | Path, *, rebuild: bool = False) -> dict[str, Path]:
    """Write ``index.html`` and ``index.md`` of a suite folder from its runs' metrics.

    ``rebuild``: rebuild every finished experiment's report too (``normlab report SUITE``);
    otherwise a report is built only where its ``summary.json`` is missing. Experiments with
    unfinished jobs are listed as such. Returns ``{"html": ..., "md": ...}``.
    """
    folder = Path(folder)
    options, entries = _entries(folder, rebuild)
    claims = _claim_rows(entries)
    paths = {"html": folder / "index.html", "md": folder / "index.md"}
    atomic_write_text(paths["md"], _index_md(folder, options, entries, claims))
    atomic_write_text(paths["html"], _index_html(folder, options, entries, claims))
    return paths


@dataclass
class _ClaimRow:
    claim: str
    words: str
    experiments: list[str]
    finding: Finding | None  # None: no finished experiment tests it
    published: str
    status: str  # "measured", "pending" (an experiment is unfinished), "untested"


def claim_findings(summaries: Sequence[Summary]) -> dict[str, Finding]:
    """One finding per claim these summaries measure, in claim order: a claim measured by several
    findings (parts, or several experiments) gets :func:`~normlab.lab.verdicts.combine`'s verdict,
    as in the index."""
    by_claim: dict[str, list[Finding]] = {}
    for summary in summaries:
        for f in summary.findings:
            by_claim.setdefault(f.claim, []).append(f)
    return {cid: found[0] if len(found) == 1 else combine(cid, found)
            for cid, found in sorted(by_claim.items(), key=lambda kv: claim_order(kv[0]))}


def suite_summaries(folder: str | Path) -> tuple[SuiteOptions, dict[str, Summary | None]]:
    """A suite folder's options and each experiment's summary (None: not finished), as the index
    reads them (a finished run without ``summary.json`` gets its report built first).

    Raises:
        ValueError: not a suite folder, or one naming an experiment this normlab does not have.
    """
    options, entries = _entries(Path(folder), rebuild=False)
    return options, {e.name: e.summary for e in entries}


def _claim_rows(entries: list[_Entry]) -> list[_ClaimRow]:
    rows = []
    for cid, claim in CLAIMS.items():
        testing = [e for e in entries if cid in e.experiment.claims]
        finding = claim_findings([e.summary for e in testing if e.summary]).get(cid)
        findings = [f for e in testing if e.summary for f in e.summary.findings if f.claim == cid]
        status = "untested" if not testing else "pending" if any(e.summary is None for e in testing) else "measured"
        published = "; ".join(dict.fromkeys(f.published for f in findings if f.published)) or claim.anchor or "-"
        rows.append(_ClaimRow(cid, claim.words, [e.name for e in testing], finding, published, status))
    return rows


def _counts(claims: list[_ClaimRow]) -> str:
    measured = [c for c in claims if c.finding is not None]
    tally: dict[str, int] = {}
    for c in measured:
        tally[c.finding.verdict] = tally.get(c.finding.verdict, 0) + 1
    parts = [f"{n} {verdict}" for verdict, n in sorted(tally.items(), key=lambda kv: -kv[1])]
    untested = sum(1 for c in claims if c.status == "untested")
    pending = sum(1 for c in claims if c.status == "pending")
    line = f"{len(measured)} of {len(claims)} claims measured" + (f": {', '.join(parts)}" if parts else "")
    if pending:
        line += f"; {pending} waiting for unfinished experiments (continue with --resume)"
    if untested:
        line += f"; {untested} without an experiment in this suite"
    return line + "."


def _facts(options: SuiteOptions, entries: list[_Entry]) -> list[str]:
    done = [e for e in entries if e.summary is not None]
    missed = [e.name for e in done if not e.summary.met]
    form = "quick form" if options.quick else "full form"
    lines = [f"{len(entries)} experiments ({form}{', ' + ', '.join(f'{k}={v}' for k, v in options.overrides.items()) if options.overrides else ''}); "
             f"{len(done)} finished."]
    if missed:
        lines.append(f"Expected outcome missed by: {', '.join(missed)} (normlab reproduce --check exits 1).")
    elif done:
        lines.append("Every finished experiment met its expected outcome.")
    return lines


_LEGEND = (
    "How to read a verdict: each experiment declared, before it ran, the statistic it measures, the outcome the "
    "published claim leads us to expect, and a rule that maps the statistic's 95% confidence interval over seeds "
    "to a verdict. Supported: the interval lies wholly on the claimed side and the estimate reaches the predicted "
    "size. Mixed: the direction holds but not the size, or some parts support the claim and others do not. "
    "Not supported: the interval lies on the other side, or within the band of no effect. Inconclusive: fewer "
    "than 3 seeds, or an interval that cannot tell the effect from none. A verdict that differs from the paper is "
    "a finding; the experiment's report says why it may differ."
)


def _cell(text: Any) -> str:
    return re.sub(r"([<>|])", r"\\\1", str(text)).replace("\n", " ")


def _index_md(folder: Path, options: SuiteOptions, entries: list[_Entry], claims: list[_ClaimRow]) -> str:
    out = ["# normlab: the claims made for batch normalization, measured", "", _counts(claims), ""]
    out += [*_facts(options, entries), "", _LEGEND, ""]
    out += ["| claim | in plain words | experiment(s) | measured (95% CI) | verdict | published | report |",
            "|---|---|---|---|---|---|---|"]
    for c in claims:
        measured = c.finding.text if c.finding else ("unfinished" if c.status == "pending" else "no experiment yet")
        verdict = c.finding.verdict if c.finding else "-"
        links = ", ".join(f"[{n}]({n}/report.md)" for n in c.experiments
                          if any(e.name == n and e.summary for e in entries)) or "-"
        out.append(f"| {c.claim} | {_cell(c.words)} | {_cell(', '.join(c.experiments) or '-')} | {_cell(measured)} | "
                   f"**{verdict}** | {_cell(c.published)} | {links} |")
    out += ["", "## Experiments", ""]
    for e in entries:
        out += [f"### {e.name} ({', '.join(e.experiment.claims)})", ""]
        if e.summary is None:
            out += [_unfinished(e), ""]
            continue
        s = e.summary
        out += [f"**{s.verdict}** ({'expected outcome met' if s.met else 'expected outcome NOT met'}). {_cell(s.headline)}", ""]
        out += [f"- {_cell(f.claim)}: {_cell(f.statistic)} = {_cell(f.text)}: **{f.verdict}** ({_cell(f.reason)})"
                for f in s.findings]
        out += ["", f"Report: [{e.name}/report.md]({e.name}/report.md)", ""]
    out += ["Rebuild this index and every report from the metrics: `normlab report " + str(folder) + "`", ""]
    return "\n".join(out)


def _unfinished(e: _Entry) -> str:
    if e.missing < 0:
        return "not started (continue with normlab reproduce --resume)."
    return f"unfinished: {e.missing} job{'s' if e.missing != 1 else ''} left (continue with normlab reproduce --resume)."


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1a1a1a;margin:0;background:#fafafa}
main{max-width:1180px;margin:0 auto;padding:1.5rem 1.25rem 3rem;background:#fff}
h1{font-size:1.6rem;margin:.2rem 0 .6rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.lead{font-size:1.1rem;font-weight:600}.legend{font-size:.9rem;color:#333;background:#f3f5f8;padding:.5rem .8rem}
table{border-collapse:collapse;font-size:.9rem;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}th{background:#f3f5f8}
.badge{display:inline-block;padding:.1rem .5rem;border-radius:1rem;font-weight:600;color:#fff;font-size:.8rem;white-space:nowrap}
.v-supported{background:#2e7d32}.v-not-supported{background:#c62828}.v-mixed{background:#ef8f00}
.v-inconclusive{background:#607d8b}.v-none{background:#bbb}
tr.untested td{color:#888}
.exp{display:flex;gap:1.2rem;align-items:flex-start;flex-wrap:wrap;margin:1rem 0;border-top:1px solid #eee;padding-top:.8rem}
.exp>div{flex:1 1 380px}.exp img{max-width:520px;width:100%;border:1px solid #eee}
.reason{font-size:.85rem;color:#444}ul.parts{margin:0;padding-left:1.1rem}
""".strip()


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _badge(verdict: str | None) -> str:
    if verdict is None:
        return '<span class="badge v-none">-</span>'
    slug = re.sub(r"[^a-z]+", "-", verdict.lower()).strip("-")
    return f'<span class="badge v-{slug}">{_h(verdict)}</span>'


def _first_figure(run: Path) -> str:
    figures = sorted((run / "figures").glob("fig1-*.png"))
    if not figures:
        return ""
    data = base64.b64encode(figures[0].read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="first figure of {_h(run.name)}">'


def _index_html(folder: Path, options: SuiteOptions, entries: list[_Entry], claims: list[_ClaimRow]) -> str:
    done = {e.name for e in entries if e.summary}
    out = ["<!doctype html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           "<title>normlab: the claims made for batch normalization, measured</title>",
           f"<style>\n{_CSS}\n</style>", "</head>", "<body>", "<main>",
           "<h1>The claims made for batch normalization, measured</h1>",
           f'<p class="lead">{_h(_counts(claims))}</p>', *(f"<p>{_h(line)}</p>" for line in _facts(options, entries)),
           f'<p class="legend">{_h(_LEGEND)}</p>', '<section id="claims">', "<h2>Claims</h2>", "<table>",
           "<thead><tr><th>claim</th><th>in plain words</th><th>experiment(s)</th><th>measured (95% CI)</th>"
           "<th>verdict</th><th>published</th></tr></thead>", "<tbody>"]
    for c in claims:
        exps = ", ".join(f'<a href="{_h(n)}/report.html">{_h(n)}</a>' if n in done else _h(n) for n in c.experiments) or "-"
        if c.finding and "; " in c.finding.text:  # several parts: one line each, the reasons are below
            measured = "<ul class=\"parts\">" + "".join(f"<li>{_h(part)}</li>" for part in c.finding.text.split("; ")) + "</ul>"
        elif c.finding:
            measured = f"{_h(c.finding.statistic)}: <strong>{_h(c.finding.text)}</strong>"
            measured += f'<div class="reason">{_h(c.finding.reason)}</div>'
        else:
            measured = "unfinished" if c.status == "pending" else "no experiment yet"
        klass = ' class="untested"' if c.status == "untested" else ""
        out.append(f"<tr{klass}><td>{_h(c.claim)}</td><td>{_h(c.words)}</td><td>{exps}</td><td>{measured}</td>"
                   f"<td>{_badge(c.finding.verdict if c.finding else None)}</td><td>{_h(c.published)}</td></tr>")
    out += ["</tbody>", "</table>", "</section>", '<section id="experiments">', "<h2>Experiments</h2>"]
    for e in entries:
        out.append('<div class="exp"><div>')
        title = f'<a href="{_h(e.name)}/report.html">{_h(e.name)}</a>' if e.summary else _h(e.name)
        out.append(f"<h3>{title} <small>({_h(', '.join(e.experiment.claims))})</small></h3>")
        if e.summary is None:
            out += [f"<p>{_h(_unfinished(e))}</p>", "</div></div>"]
            continue
        s = e.summary
        met = "expected outcome met" if s.met else "expected outcome NOT met"
        out.append(f"<p>{_badge(s.verdict)} <em>{_h(met)}</em>. {_h(s.headline)}</p>")
        out += ["<ul>", *(f"<li>{_h(f.claim)} {_badge(f.verdict)} {_h(f.statistic)}: <strong>{_h(f.text)}</strong>"
                          f'<div class="reason">{_h(f.reason)}</div></li>' for f in s.findings), "</ul>"]
        if s.notes:
            out += ["<details><summary>Notes</summary><ul>", *(f"<li>{_h(n)}</li>" for n in s.notes), "</ul></details>"]
        out += ["</div>", f"<div>{_first_figure(folder / e.name)}</div>", "</div>"]
    out += ["</section>", f"<p>Rebuild this index and every report from the metrics: <code>normlab report {_h(folder)}</code></p>",
            "</main>", "</body>", "</html>", ""]
    return "\n".join(out)
