"""Verdicts: the rule, declared before a run, that turns a measured statistic into a verdict.

Each experiment declares, in code, one :class:`Rule` per claim it tests: the statistic, the
outcome the published claim leads us to expect, the value that means "no effect" (``null``),
the direction the claim predicts, and the effect size it predicts (``target``). After the run,
:meth:`Rule.decide` maps the estimate and its 95% confidence interval over seeds to one of
four verdicts:

=================  =============================================================================
``inconclusive``   fewer than ``min_seeds`` seeds (3), or the CI contains the null value: the
                   data cannot tell the claimed effect from none
``supported``      the CI lies wholly on the claimed side of the null value and the estimate
                   reaches the predicted effect size
``mixed``          the CI lies wholly on the claimed side, but the estimate falls short of the
                   predicted size (the direction holds, the size does not); or, when several
                   findings are combined, some support the claim and some do not
``not supported``  the CI lies wholly on the other side of the null value (the opposite effect),
                   or wholly inside the ``equivalence`` band around it (no effect worth the name)
=================  =============================================================================

A claim that two things do *not* differ (``direction="equivalent"``) is supported when the CI
lies wholly within the ``equivalence`` band around ``null``, not supported when it lies wholly
outside it, and inconclusive otherwise.

The expected outcome is *met* when the verdict is ``supported``; ``--check`` exits 1 otherwise,
and the finding's ``reason`` says why in words.

>>> rule = Rule("C1", "speed-up (steps none / steps BN)", expected="BN reaches the target in >= 3x fewer steps",
...             null=1.0, target=3.0, log=True)
>>> rule.decide(5.5, 3.2, 9.6, n=3).verdict
'supported'
>>> rule.decide(2.0, 1.5, 2.7, n=3).verdict
'mixed'
>>> rule.decide(5.5, 0.8, 30.0, n=3).verdict
'inconclusive'
>>> rule.decide(5.5, 3.2, 9.6, n=2).reason
'only 2 seeds: a verdict needs at least 3 (run with --seeds 3 or more)'
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["VERDICTS", "Finding", "Rule", "combine"]

VERDICTS = ("supported", "not supported", "mixed", "inconclusive")


@dataclass
class Finding:
    """One claim's measured outcome: the statistic, its CI, and the verdict of the declared rule.

    Attributes:
        claim: the claim's id, e.g. ``"C5"`` (see :data:`normlab.lab.claims.CLAIMS`).
        statistic: what was measured, in words.
        estimate, low, high: the estimate and its 95% CI (``None`` when nothing could be measured).
        n: the number of seeds (or independent repeats) behind the CI.
        verdict: one of :data:`VERDICTS`.
        expected: the expected outcome, from the published claim, in words.
        met: whether the verdict is the expected one (``supported``).
        reason: why the verdict is what it is, in words (always set).
        published: the published figure to print beside ours.
        text: the estimate and CI formatted for the index (e.g. ``"5.5x [3.2, 9.6]"``).
        lower_bound: the estimate is a lower bound (e.g. counted runs that never reached the target).
        label: a short name for the statistic (e.g. "tanh, at init"), used where findings are listed.
    """

    claim: str
    statistic: str
    estimate: float | None
    low: float | None
    high: float | None
    n: int
    verdict: str
    expected: str
    met: bool
    reason: str
    published: str = ""
    text: str = ""
    lower_bound: bool = False
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _fmt(value: float, unit: str, digits: int) -> str:
    return f"{value:.{digits}f}{unit}"


@dataclass(frozen=True)
class Rule:
    """A claim's verdict rule, declared before the run (see the module docstring).

    Args:
        claim: the claim's id.
        statistic: what is measured, in words.
        expected: the expected outcome in words (taken from the published claim).
        null: the statistic's value when the claimed effect is absent (1 for ratios, 0 for differences).
        direction: ``"greater"`` if the claim predicts a statistic above ``null``, ``"less"`` below,
            ``"equivalent"`` within ``equivalence`` of it.
        target: the predicted effect size (default ``null``: any effect in the right direction).
        equivalence: half-width of a band around ``null`` within which an effect counts as none
            (a CI wholly inside it is "not supported"); 0 disables it. For ratios (``log``) the
            band is multiplicative: ``null / (1 + e)`` to ``null * (1 + e)``.
        min_seeds: the fewest seeds a verdict needs.
        log: the statistic is a ratio (printed as ``2.5x``).
        unit, digits: how the index prints it.
        published: the published figure, for the index.
        label: a short name for the statistic where findings are listed (default: ``statistic``).
    """

    claim: str
    statistic: str
    expected: str
    null: float = 0.0
    direction: str = "greater"
    target: float | None = None
    equivalence: float = 0.0
    min_seeds: int = 3
    log: bool = False
    unit: str = ""
    digits: int = 3
    published: str = ""
    label: str = ""

    def __post_init__(self) -> None:
        if self.direction not in ("greater", "less", "equivalent"):
            raise ValueError(f"Rule.direction must be 'greater', 'less' or 'equivalent', got {self.direction!r}.")
        if self.direction == "equivalent" and self.equivalence <= 0:
            raise ValueError("Rule(direction='equivalent') needs equivalence > 0: the half-width of the band of "
                             "values that count as 'no difference'.")
        if self.min_seeds < 2:
            raise ValueError(f"Rule.min_seeds must be at least 2 (a CI needs 2 values), got {self.min_seeds}.")

    def format(self, estimate: float | None, low: float | None, high: float | None, *, lower_bound: bool = False) -> str:
        if estimate is None:
            return "n/a"
        unit = "x" if self.log and not self.unit else self.unit
        digits = 1 if self.log and self.digits == 3 else self.digits
        text = _fmt(estimate, unit, digits)
        if low is not None and high is not None:
            text += f" [{_fmt(low, '', digits)}, {_fmt(high, '', digits)}]"
        return ("at least " + text) if lower_bound else text

    def _beyond(self, value: float, threshold: float) -> bool:
        """``value`` lies strictly on the claimed side of ``threshold``."""
        return value > threshold if self.direction == "greater" else value < threshold

    def decide(self, estimate: float | None, low: float | None, high: float | None, *, n: int,
               lower_bound: bool = False, note: str = "") -> Finding:
        """The verdict for an estimate and its 95% CI over ``n`` seeds (see the module docstring).

        ``lower_bound``: the estimate (and CI) may understate the effect (e.g. runs that never
        reached a target counted at the step budget); the index says "at least". ``note`` is
        added to the reason.
        """
        text = self.format(estimate, low, high, lower_bound=lower_bound)

        def finding(verdict: str, reason: str) -> Finding:
            return Finding(self.claim, self.statistic, estimate, low, high, n, verdict, self.expected,
                           verdict == "supported", reason + (f"; {note}" if note else ""), self.published, text,
                           lower_bound, self.label)

        if estimate is None or low is None or high is None or any(map(math.isnan, (estimate, low, high))):
            return finding("inconclusive", "nothing could be measured (no job produced the statistic)")
        if n < self.min_seeds:
            return finding("inconclusive", f"only {n} seed{'s' if n != 1 else ''}: a verdict needs at least "
                                           f"{self.min_seeds} (run with --seeds {self.min_seeds} or more)")
        if self.direction == "equivalent":
            return self._decide_equivalent(estimate, low, high, finding)
        near, far = (low, high) if self.direction == "greater" else (high, low)
        target = self.null if self.target is None else self.target
        band = self._band()
        if self._beyond(near, self.null):
            if self.target is None or self._beyond(estimate, target) or estimate == target:
                return finding("supported", f"the 95% CI {self._ci(low, high)} lies wholly on the claimed side of "
                                            f"{self._num(self.null)}" + (f" and the estimate reaches the predicted "
                                                                        f"{self._num(target)}" if self.target is not None else ""))
            return finding("mixed", f"the effect has the claimed direction (CI {self._ci(low, high)} excludes "
                                    f"{self._num(self.null)}) but the estimate {self._num(estimate)} falls short of "
                                    f"the predicted {self._num(target)}"
                                    + (" (the estimate is a lower bound: runs that never reached the target count "
                                       "at the step budget; a longer run may reach it)" if lower_bound else ""))
        if band is not None and band[0] <= low and high <= band[1]:
            return finding("not supported", f"the 95% CI {self._ci(low, high)} lies within "
                                            f"{self._ci(*band)}, the band of no effect worth the name")
        if not self._beyond(far, self.null):
            if low == high == self.null:
                return finding("not supported", f"the 95% CI {self._ci(low, high)} lies at {self._num(self.null)}: "
                                                f"no effect in the claimed direction")
            return finding("not supported", f"the 95% CI {self._ci(low, high)} lies wholly on the other side of "
                                            f"{self._num(self.null)}: the opposite of the claimed effect")
        return finding("inconclusive", f"the 95% CI {self._ci(low, high)} contains {self._num(self.null)} "
                                       f"(no effect): more seeds may tell")

    def _decide_equivalent(self, estimate: float, low: float, high: float, finding) -> Finding:
        """A claim of no difference: supported when the CI lies within the band around ``null``."""
        lo, hi = self._band()
        if lo <= low and high <= hi:
            return finding("supported", f"the 95% CI {self._ci(low, high)} lies within {self._ci(lo, hi)}, "
                                        f"the band of differences too small to matter")
        if low > hi or high < lo:
            return finding("not supported", f"the 95% CI {self._ci(low, high)} lies wholly outside "
                                            f"{self._ci(lo, hi)}: a real difference")
        return finding("inconclusive", f"the 95% CI {self._ci(low, high)} overlaps the edge of {self._ci(lo, hi)}, "
                                       f"the band of no difference: more seeds may tell")

    def _band(self) -> tuple[float, float] | None:
        if self.equivalence <= 0:
            return None
        if self.log:
            return self.null / (1 + self.equivalence), self.null * (1 + self.equivalence)
        return self.null - self.equivalence, self.null + self.equivalence

    def _num(self, value: float) -> str:
        return self.format(value, None, None)

    def _ci(self, low: float, high: float) -> str:
        return f"[{self._num(low)}, {self._num(high)}]"


def combine(claim: str, findings: Sequence[Finding], *, statistic: str = "", expected: str = "",
            published: str = "") -> Finding:
    """One verdict for a claim measured by several findings (e.g. at several learning rates, or
    for sigmoid and ReLU networks):

    * all the same verdict: that verdict;
    * any ``inconclusive`` while the others agree: ``inconclusive`` (we cannot tell yet);
    * ``supported`` beside ``not supported`` or ``mixed``: ``mixed``;
    * ``mixed`` beside ``not supported``: ``mixed``.

    The combined finding lists every part's verdict in its reason and text.

    >>> parts = [Finding("C13", "sigmoid", 1, 0.5, 1.5, 3, "supported", "", True, "r"),
    ...          Finding("C13", "relu", 1, 0.5, 1.5, 3, "not supported", "", False, "r")]
    >>> combine("C13", parts).verdict
    'mixed'
    """
    if not findings:
        raise ValueError(f"combine({claim!r}) needs at least one finding.")
    verdicts = [f.verdict for f in findings]
    decided = {v for v in verdicts if v != "inconclusive"}
    if len(set(verdicts)) == 1:
        verdict = verdicts[0]
    elif "supported" in decided and decided - {"supported"}:
        verdict = "mixed"
    elif decided == {"mixed", "not supported"}:
        verdict = "mixed"
    else:
        verdict = "inconclusive"
    reason = "; ".join(f"{f.label or f.statistic}: {f.verdict} ({f.reason})" for f in findings)
    text = "; ".join(f"{f.label or f.statistic}: {f.text} ({f.verdict})" for f in findings)
    return Finding(claim, statistic or " / ".join(f.statistic for f in findings), None, None, None,
                   min(f.n for f in findings), verdict, expected or findings[0].expected, verdict == "supported",
                   reason, published or findings[0].published, text, any(f.lower_bound for f in findings),
                   " / ".join(f.label or f.statistic for f in findings))
