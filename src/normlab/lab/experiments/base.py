"""What an experiment is: a claim, configs (default and quick), probes, a summary and figures.

An experiment is data plus one function: it declares the claim it tests, its configurations,
which probe values the trainer records, which figures the report draws (:class:`FigureSpec`),
and :meth:`Experiment.summarize`, which turns ``metrics.jsonl`` rows into a :class:`Summary`
with a verdict measured against the declared expected outcome. The report is built from the
metrics alone, so it can always be rebuilt.
"""

from __future__ import annotations

import abc

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..verdicts import Finding, combine
from .registry import EXPERIMENTS, get_experiment, register  # noqa: F401 (the registry's names, for convenience)

if TYPE_CHECKING:
    from torch import nn

    from ..config import ExperimentConfig

__all__ = ["Experiment", "FigureSpec", "Probe", "Summary"]


@dataclass
class Summary:
    """The measured outcome of a run, in a form the report and the command line print.

    Attributes:
        experiment: the experiment's name.
        claim: the claim tested, e.g. "C1: batch norm makes training faster".
        verdict: "supported", "not supported", "mixed" or "inconclusive" (see :mod:`normlab.lab.verdicts`).
        expected: the declared expected outcome, in words.
        met: whether the measured outcome meets the expected one (``--check`` exits 1 if not).
        headline: one sentence with the key measured number(s).
        columns: the summary table's header.
        rows: the summary table's rows, already formatted as strings.
        published: the published anchors, one line each (the paper's figure beside ours).
        notes: further remarks (e.g. seeds that never reached the target).
        findings: one :class:`~normlab.lab.verdicts.Finding` per claim tested (the suite's index rows).
    """

    experiment: str
    claim: str
    verdict: str
    expected: str
    met: bool
    headline: str
    columns: list[str]
    rows: list[list[str]]
    published: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["findings"] = [f.to_dict() for f in self.findings]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Summary":
        """The inverse of :meth:`to_dict` (e.g. a run's ``summary.json``)."""
        data = dict(data)
        data["findings"] = [Finding(**f) for f in data.get("findings", [])]
        return cls(**data)

    @classmethod
    def of_findings(cls, experiment: "Experiment", findings: list[Finding], *, headline: str, columns: list[str],
                    rows: list[list[str]], published: list[str] | None = None,
                    notes: list[str] | None = None) -> "Summary":
        """A summary whose verdict and ``met`` follow from its findings (one per claim tested):
        the verdict combines theirs (:func:`~normlab.lab.verdicts.combine`), ``met`` holds when
        every finding met its expected outcome, and ``expected`` lists each finding's."""
        verdict = combine("all", findings).verdict if findings else "inconclusive"
        reasons = [f"{f.claim} {f.verdict}: {f.reason}" for f in findings if not f.met]
        return cls(
            experiment=experiment.name, claim=experiment.claim, verdict=verdict,
            expected="; ".join(f"{f.claim}: {f.expected}" for f in findings),
            met=bool(findings) and all(f.met for f in findings), headline=headline, columns=columns, rows=rows,
            published=list(published or []), notes=list(notes or []) + [f"Expected outcome missed: {r}." for r in reasons],
            findings=findings,
        )


@dataclass(frozen=True)
class FigureSpec:
    """One figure of the report, drawn from metrics rows by :mod:`normlab.lab.report`.

    kind:
        ``"curve"``: ``metric`` (a key of the metrics rows, e.g. ``"test_acc"``) against ``step``,
        one line per arm (mean over seeds) with a band from the seeds' min to max.
        ``"percentiles"``: probe values ``{probe}_p15``, ``{probe}_p50``, ``{probe}_p85`` (keys of
        the rows' ``probes`` dict) against ``step``, one panel per arm, the 50th as a line and
        the 15th/85th as lines around it, seeds averaged (as Ioffe & Szegedy's Fig. 1b,c).

        ``"grid"``: a statistic of each job against the grid axis ``axis``, one line per arm
        (mean over seeds) with a band from the seeds' min to max (a text axis: a point per
        category with the seeds' range as an error bar, no line). The statistic is ``metric``
        (a row key or probe name) reduced over a job's rows by ``reduce``: ``"final"`` (the
        last evaluation), ``"best"`` (max), ``"min"``, ``"mean"``. A numeric axis spanning more
        than 20x is drawn on a log scale (or always with ``logx``); a text axis as categories.
        ``marks``: vertical lines ``((x, label), ...)`` (e.g. standard initializations);
        ``levels``: horizontal lines ``((y, label), ...)`` (e.g. a declared bound).

        ``"series"``: named lines from probe keys ``{probe}:{line}:{x}`` (x numeric) of each job's
        ``reduce`` row (``"final"``: the last that has them, or ``"first"``), one line per name
        (per arm and name with several arms) against x, labelled ``xlabel``; mean over seeds, band
        from the seeds' min to max. For values a job measures several ways at once (e.g. one line
        per test-time method, against severity).

    For every kind, ``where`` keeps only the jobs at those grid values (``{"train.lr": 0.1}``),
    and ``panel`` draws one panel per value of that grid axis.
    """

    kind: str
    title: str
    ylabel: str
    metric: str = ""
    probe: str = ""
    caption: str = ""
    logy: bool = False
    axis: str = ""
    reduce: str = "final"
    logx: bool | None = None
    panel: str = ""
    where: tuple[tuple[str, Any], ...] = ()
    marks: tuple[tuple[float, str], ...] = ()
    levels: tuple[tuple[float, str], ...] = ()
    xlabel: str = ""


@dataclass(frozen=True)
class Probe:
    """A value recorded at every evaluation: ``fn(model)`` is called after the test pass.

    ``prefix`` names the values; ``attach(model)`` installs hooks and returns a callable that
    gives ``{name: float}`` for the last evaluation and a remover.
    """

    prefix: str
    attach: Callable[["nn.Module"], tuple[Callable[[], dict[str, float]], Callable[[], None]]]


class Experiment(abc.ABC):
    """Base class: subclasses set the attributes and implement the abstract methods."""

    name: str = ""
    claim: str = ""
    title: str = ""
    description: str = ""
    claims: tuple[str, ...] = ()  # the ids of the claims tested (normlab.lab.claims.CLAIMS)
    figures: tuple[FigureSpec, ...] = ()
    # Config keys that job_config sets in every job, mapped to the rule in words (a user's
    # override of them would be ignored, so the command line rejects it).
    derived: dict[str, str] = {}

    @abc.abstractmethod
    def default_config(self) -> "ExperimentConfig":
        """See the class docstring."""

    @abc.abstractmethod
    def quick_config(self) -> "ExperimentConfig":
        """See the class docstring."""

    def probes(self, config: "ExperimentConfig", arm: str) -> list[Probe]:
        return []

    def job_config(self, config: "ExperimentConfig") -> "ExperimentConfig":
        """The config one job trains with, given its arm's config at its grid point.

        Override to derive settings that follow from others by a declared rule (e.g. Wu & He's
        learning rate scaled with the batch size, or equal epochs at every batch size); the
        default returns ``config`` unchanged. Must be a pure function of ``config``. List every
        key it sets in :attr:`derived`.
        """
        return config

    def check_params(self, params: dict[str, Any]) -> None:
        """Raise a ``ConfigError`` for params the outcome cannot be measured with (e.g. a target
        accuracy above 1); called before the run folder is written. The default accepts any
        (their types and finiteness are checked by the config)."""

    def measurements(self, model: "nn.Module", data: Any, config: "ExperimentConfig", arm: str) -> dict[str, float]:
        """Extra values recorded at every evaluation, beside the probes' (``row["probes"]``).

        Called with the model in eval mode, under ``torch.no_grad()``, after the test metrics;
        ``data`` is the job's :class:`~normlab.lab.data.Dataset`. A measurement that needs the
        model in training mode or gradients must work on a copy (``copy.deepcopy(model)``) and
        enable them itself. The default measures nothing.
        """
        return {}

    def custom_job(self, job: Any, data: Any) -> list[dict[str, Any]] | None:
        """Rows of a job that is not a training run (e.g. a measurement of time and memory), or
        None (default) to train. Runs with one torch thread, like every job; each row needs at
        least ``step``, ``arm`` and ``seed`` (and ``point`` with a grid)."""
        return None

    @abc.abstractmethod
    def summarize(self, rows: list[dict[str, Any]], config: dict[str, Any]) -> Summary:
        """See the class docstring."""
