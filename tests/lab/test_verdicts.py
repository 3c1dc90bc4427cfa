"""Verdict rules: the four verdicts, lower bounds, equivalence claims, combining findings; CI clipping."""

from __future__ import annotations

import pytest

from normlab.lab.intervals import geometric_mean_ci, mean_ci
from normlab.lab.verdicts import VERDICTS, Finding, Rule, combine

SPEED = Rule("C1", "speed-up", expected="at least 3x fewer steps", null=1.0, target=3.0, log=True)
GAP = Rule("C6", "gap", expected="a smaller gap with BN", null=0.0, direction="less", equivalence=0.01)
SAME = Rule("C13", "after - before", expected="no difference", direction="equivalent", equivalence=0.02)


@pytest.mark.parametrize("rule, estimate, low, high, n, verdict", [
    (SPEED, 5.5, 3.2, 9.6, 3, "supported"),
    (SPEED, 2.0, 1.5, 2.7, 3, "mixed"),            # right direction, short of the predicted size
    (SPEED, 0.5, 0.3, 0.8, 3, "not supported"),    # the opposite effect
    (SPEED, 1.2, 0.8, 1.9, 5, "inconclusive"),     # the CI holds 1x
    (SPEED, 5.5, 3.2, 9.6, 2, "inconclusive"),     # too few seeds
    (GAP, -0.05, -0.08, -0.02, 3, "supported"),    # direction "less"
    (GAP, 0.03, 0.01, 0.05, 3, "not supported"),
    (GAP, 0.001, -0.005, 0.006, 4, "not supported"),  # wholly inside the band of no effect
    (GAP, -0.01, -0.03, 0.01, 4, "inconclusive"),
    (SAME, 0.0, -0.01, 0.015, 3, "supported"),
    (SAME, 0.08, 0.05, 0.11, 3, "not supported"),
    (SAME, 0.01, -0.01, 0.04, 3, "inconclusive"),
])
def test_the_four_verdicts(rule, estimate, low, high, n, verdict):
    finding = rule.decide(estimate, low, high, n=n)
    assert finding.verdict == verdict and verdict in VERDICTS
    assert finding.met == (verdict == "supported")
    assert finding.reason  # every verdict says why


def test_a_ci_exactly_at_the_null_is_no_effect_not_the_opposite():
    assert "band of no effect" in GAP.decide(0.0, 0.0, 0.0, n=3).reason
    finding = SPEED.decide(1.0, 1.0, 1.0, n=3)
    assert finding.verdict == "not supported" and "lies at 1.0x: no effect in the claimed direction" in finding.reason


def test_too_few_seeds_says_why_and_never_says_not_supported():
    finding = SPEED.decide(0.5, 0.3, 0.8, n=2)
    assert finding.verdict == "inconclusive"
    assert finding.reason == "only 2 seeds: a verdict needs at least 3 (run with --seeds 3 or more)"


def test_nothing_measured_is_inconclusive():
    finding = SPEED.decide(None, None, None, n=0, note="the batch-norm arm never reached the target")
    assert finding.verdict == "inconclusive" and "never reached the target" in finding.reason
    assert finding.text == "n/a"


def test_a_lower_bound_is_labelled_as_one():
    finding = SPEED.decide(2.6, 1.5, 4.7, n=3, lower_bound=True)
    assert finding.text == "at least 2.6x [1.5, 4.7]" and finding.lower_bound
    assert finding.verdict == "mixed" and "lower bound" in finding.reason


def test_rule_arguments_are_checked():
    with pytest.raises(ValueError, match="direction must be 'greater', 'less' or 'equivalent', got 'up'"):
        Rule("C1", "s", expected="e", direction="up")
    with pytest.raises(ValueError, match="needs equivalence > 0"):
        Rule("C13", "s", expected="e", direction="equivalent")
    with pytest.raises(ValueError, match="min_seeds must be at least 2"):
        Rule("C1", "s", expected="e", min_seeds=1)


def _finding(verdict: str) -> Finding:
    return Finding("C7", f"part {verdict}", 1.0, 0.5, 1.5, 3, verdict, "e", verdict == "supported", "r", text="1.0")


@pytest.mark.parametrize("parts, verdict", [
    (["supported", "supported"], "supported"),
    (["supported", "not supported"], "mixed"),
    (["supported", "mixed"], "mixed"),
    (["mixed", "not supported"], "mixed"),
    (["not supported", "not supported"], "not supported"),
    (["supported", "inconclusive"], "inconclusive"),
    (["inconclusive", "inconclusive"], "inconclusive"),
])
def test_combining_findings(parts, verdict):
    combined = combine("C7", [_finding(v) for v in parts])
    assert combined.verdict == verdict and combined.met == (verdict == "supported")
    assert all(f"part {v}: {v}" in combined.reason for v in parts)


def test_an_accuracy_ci_never_leaves_0_to_1():
    # Two seeds near the top: the raw t-interval runs past 1 (the bug seen as [0.6289, 1.0481]).
    mean, low, high = mean_ci([0.9, 0.99])
    assert high > 1
    raw_low = mean_ci([0.9, 0.99])[1]
    mean, low, high = mean_ci([0.9, 0.99], bounds=(0.0, 1.0))
    assert high == 1.0 and low == raw_low  # only the side past the bound moves
    assert 0.0 <= low <= mean <= high <= 1.0
    assert mean_ci([0.01, 0.2], bounds=(0.0, 1.0))[1] == 0.0


def test_geometric_mean_ci_is_the_t_interval_of_logs():
    gm, low, high = geometric_mean_ci([2.0, 8.0])
    assert gm == pytest.approx(4.0) and low < 4.0 < high and low > 0
    with pytest.raises(ValueError, match="positive ratios"):
        geometric_mean_ci([1.0, 0.0])
