"""``normlab compare``: do the verdicts hold on other seeds and on other data sets?

A verdict the lab reports should not hang on the seeds it happened to run or on the one data set
it trained on. Run the suite (or one experiment) again with ``--first-seed`` or ``--data`` and
compare the folders: every claim's verdict side by side, then every finding (each part of a
claim, per experiment) with its estimate and 95% CI, and for each row whether the verdict is

=================  ============================================================================
``same``           one verdict in every folder that measured it
``differs``        not the same, without contradiction: e.g. supported on one set of seeds,
                   inconclusive or mixed on another (the claim's support is not robust)
``contradicts``    supported in one folder and not supported in another
``not compared``   measured in fewer than two of the folders
=================  ============================================================================

Each folder is a suite folder (``normlab reproduce``) or a run folder (``normlab run``); the
header names what set them apart (the options that differ: ``train.first_seed``,
``data.name``, ...). Nothing is re-run: the verdicts are read as the index reads them (a
finished run without ``summary.json`` gets its report built from its metrics first).

Example::

    normlab reproduce --quick --out runs/q0
    normlab reproduce --quick --first-seed 100 --out runs/q100
    normlab compare runs/q0 runs/q100 --check      # exit 1 if any claim's verdict differs
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .claims import CLAIMS
from .experiments.base import Summary
from .verdicts import Finding

__all__ = ["AGREEMENTS", "Compared", "Comparison", "Source", "agreement", "compare_folders", "comparison_md",
           "read_source"]

AGREEMENTS = ("same", "differs", "contradicts", "not compared")


@dataclass
class Source:
    """One compared folder: what it ran with, and what it measured.

    Attributes:
        path: the folder.
        kind: ``"suite"`` or ``"run"``.
        settings: the options it ran with, as dotted keys (a suite: its form, the config its
            experiments share, and the overrides given to ``normlab reproduce``; a run: its
            whole resolved config).
        summaries: each experiment's summary (None: not finished).
        given: a suite's overrides (the keys set for every experiment).
    """

    path: Path
    kind: str
    settings: dict[str, Any]
    summaries: dict[str, Summary | None]
    given: dict[str, Any] = field(default_factory=dict)

    @property
    def unfinished(self) -> list[str]:
        return [name for name, s in self.summaries.items() if s is None]


@dataclass
class Compared:
    """One row of the comparison: a claim (``experiment`` and ``part`` empty) or one finding."""

    claim: str
    experiment: str
    part: str
    findings: list[Finding | None]  # one per source, None where not measured
    agreement: str


@dataclass
class Comparison:
    sources: list[Source]
    labels: list[str]  # per source: its path and the settings that set it apart
    claims: list[Compared] = field(default_factory=list)
    parts: list[Compared] = field(default_factory=list)

    @property
    def robust(self) -> bool:
        """Every claim compared has one verdict in every folder (``--check``)."""
        compared = [row for row in self.claims if row.agreement != "not compared"]
        return bool(compared) and all(row.agreement == "same" for row in compared)

    def to_dict(self) -> dict[str, Any]:
        def row(r: Compared) -> dict[str, Any]:
            return {"claim": r.claim, "experiment": r.experiment, "part": r.part, "agreement": r.agreement,
                    "verdicts": [None if f is None else f.verdict for f in r.findings],
                    "measured": [None if f is None else f.text for f in r.findings]}

        return {"sources": [{"path": str(s.path), "kind": s.kind, "label": label, "unfinished": s.unfinished}
                            for s, label in zip(self.sources, self.labels)],
                "robust": self.robust, "claims": [row(r) for r in self.claims], "parts": [row(r) for r in self.parts]}


def agreement(verdicts: Sequence[str | None]) -> str:
    """How the verdicts of one row agree (None: not measured in that folder).

    >>> agreement(["supported", "supported"]), agreement(["supported", "inconclusive"])
    ('same', 'differs')
    >>> agreement(["supported", "mixed", "not supported"]), agreement(["supported", None])
    ('contradicts', 'not compared')
    """
    measured = [v for v in verdicts if v is not None]
    if len(measured) < 2:
        return "not compared"
    if len(set(measured)) == 1:
        return "same"
    if {"supported", "not supported"} <= set(measured):
        return "contradicts"
    return "differs"


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flat(f"{prefix}.{key}" if prefix else str(key), inner))
        return out
    return {prefix: value}


def read_source(folder: str | Path) -> Source:
    """Read a suite or run folder's settings and summaries (an unfinished experiment's summary is
    None: its claims count as not measured there).

    Raises:
        ValueError: neither a suite folder (``suite.json``) nor a run folder (``config.json``
            written by ``normlab run``).
    """
    from .report import write_report
    from .suite import is_suite, suite_summaries
    from .trainer import unfinished_jobs

    path = Path(folder)
    if is_suite(path):
        options, summaries = suite_summaries(path)
        # the settings all its experiments ran with (data, seeds, device...), then what it was given
        configs = [_run_settings(path / name) for name in summaries if (path / name / "config.json").is_file()]
        common = {k: v for k, v in configs[0].items()
                  if k != "experiment" and all(c.get(k, _MISSING) == v for c in configs)} if configs else {}
        settings = {"form": "quick" if options.quick else "full", **common, **options.overrides}
        return Source(path, "suite", settings, summaries, dict(options.overrides))
    if not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is neither a suite folder (no suite.json) nor a run folder (no config.json); "
                         f"give folders written by normlab reproduce or normlab run.")
    settings = _run_settings(path)
    experiment = settings.pop("experiment")
    missing = unfinished_jobs(path)
    summary = None
    if not missing:
        summary_file = path / "summary.json"
        if not summary_file.is_file():
            write_report(path)
        summary = Summary.from_dict(json.loads(summary_file.read_text(encoding="utf-8")))
    return Source(path, "run", settings, {experiment: summary})


_MISSING = object()


def _run_settings(run: Path) -> dict[str, Any]:
    """A run folder's resolved config as dotted keys (``experiment`` kept; arms, grid and the
    experiment's own params left out: they belong to the experiment, not to how it was run)."""
    config_file = run / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not JSON ({err}); is it a run folder written by normlab run?") from None
    if not isinstance(config, dict) or "experiment" not in config:
        raise ValueError(f"{config_file} has no 'experiment' key; give folders written by normlab reproduce or "
                         f"normlab run.")
    return {"experiment": config["experiment"],
            **_flat("", {k: v for k, v in config.items() if k not in ("experiment", "arms", "grid", "params")})}


def _labels(sources: list[Source]) -> list[str]:
    """Each folder's path, and the settings in which the folders differ: a key whose value
    differs among the folders that record it, or one a suite was given that another folder does
    not record (a suite records only the config its experiments share)."""
    keys = sorted({k for s in sources for k in s.settings})

    def differs(key: str) -> bool:
        present = [json.dumps(s.settings[key], sort_keys=True, default=str) for s in sources if key in s.settings]
        given = any(key in s.given for s in sources)
        return len(set(present)) > 1 or (given and len(present) < len(sources))

    differing = [k for k in keys if differs(k)]
    labels = []
    for s in sources:
        told = ", ".join(f"{k}={json.dumps(s.settings[k], default=str)}" for k in differing if k in s.settings)
        labels.append(f"{s.path}" + (f" ({told})" if told else ""))
    return labels


def compare_folders(folders: Sequence[str | Path]) -> Comparison:
    """Compare the verdicts of two or more suite or run folders, claim by claim and finding by finding.

    Raises:
        ValueError: fewer than two folders, the same folder twice, a folder that is neither a
            suite nor a run, or folders that share no measured claim.
    """
    from .suite import claim_findings

    if len(folders) < 2:
        raise ValueError(f"compare needs at least two folders, got {len(folders)}; run the suite again with "
                         f"--first-seed or --data and compare the two.")
    resolved = [Path(f).resolve() for f in folders]
    if len(set(resolved)) < len(resolved):
        raise ValueError(f"compare got the same folder twice ({', '.join(map(str, folders))}); give different runs.")
    sources = [read_source(f) for f in folders]
    claim_sets = [claim_findings([s for s in src.summaries.values() if s is not None]) for src in sources]
    comparison = Comparison(sources, _labels(sources))
    for cid in CLAIMS:
        found = [claims.get(cid) for claims in claim_sets]
        if any(f is not None for f in found):
            comparison.claims.append(Compared(cid, "", "", found, agreement([f and f.verdict for f in found])))
    if not any(row.agreement != "not compared" for row in comparison.claims):
        measured = "; ".join(f"{src.path} measures {', '.join(claims) or 'nothing yet'}"
                             for src, claims in zip(sources, claim_sets))
        raise ValueError(f"the folders share no measured claim ({measured}): nothing to compare; compare runs of "
                         f"the same experiments (an unfinished suite continues with normlab reproduce --resume).")
    parts: dict[tuple[str, str, str], list[Finding | None]] = {}
    for i, src in enumerate(sources):
        for name, summary in src.summaries.items():
            for f in summary.findings if summary is not None else []:
                key = (f.claim, name, f.label or f.statistic)
                parts.setdefault(key, [None] * len(sources))[i] = f
    order = {cid: i for i, cid in enumerate(CLAIMS)}
    for (cid, name, part), found in sorted(parts.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0][1])):
        comparison.parts.append(Compared(cid, name, part, found, agreement([f and f.verdict for f in found])))
    return comparison


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _tally(rows: list[Compared]) -> str:
    counts = {a: [r.claim for r in rows if r.agreement == a] for a in AGREEMENTS}
    compared = len(rows) - len(counts["not compared"])
    line = f"{len(counts['same'])} of {compared} claims compared have the same verdict in every folder"
    for a in ("differs", "contradicts"):
        if counts[a]:
            line += f"; {a}: {', '.join(counts[a])}"
    if counts["not compared"]:
        line += f"; measured in only one folder: {', '.join(counts['not compared'])}"
    return line + "."


def comparison_md(comparison: Comparison) -> str:
    """The comparison as Markdown: the folders, a tally, the claims' verdicts, every finding."""
    letters = [chr(ord("A") + i) if i < 26 else f"S{i + 1}" for i in range(len(comparison.sources))]
    lines = [f"# Verdicts compared across {len(comparison.sources)} folders", ""]
    for letter, label, src in zip(letters, comparison.labels, comparison.sources):
        unfinished = f"; not finished: {', '.join(src.unfinished)}" if src.unfinished else ""
        lines.append(f"- **{letter}**: {src.kind} {_cell(label)}{unfinished}")
    lines += ["", _tally(comparison.claims), "",
              "Same: one verdict everywhere. Differs: decisive in some folders, inconclusive or mixed in others "
              "(the verdict is not robust). Contradicts: supported in one folder, not supported in another.", "",
              "| claim | in plain words | " + " | ".join(letters) + " | agreement |",
              "|---|---|" + "---|" * len(letters) + "---|"]
    for row in comparison.claims:
        cells = ["-" if f is None else f"**{f.verdict}**" for f in row.findings]
        lines.append(f"| {row.claim} | {_cell(CLAIMS[row.claim].words)} | " + " | ".join(cells) + f" | {row.agreement} |")
    lines += ["", "## Every finding", "",
              "| claim | experiment | statistic | " + " | ".join(letters) + " | agreement |",
              "|---|---|---|" + "---|" * len(letters) + "---|"]
    for row in comparison.parts:
        cells = ["-" if f is None else f"{_cell(f.text or '-')} (**{f.verdict}**)" for f in row.findings]
        lines.append(f"| {row.claim} | {row.experiment} | {_cell(row.part)} | " + " | ".join(cells)
                     + f" | {row.agreement} |")
    return "\n".join(lines) + "\n"
