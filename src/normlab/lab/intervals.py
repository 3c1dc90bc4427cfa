"""Confidence intervals over seeds: Student's t for means, and for geometric means of ratios.

Seeds are few (3 to 10), so the normal 1.96 would be too narrow; the t quantiles below are the
standard two-sided 95% values.

>>> from normlab.lab.intervals import mean_ci
>>> mean, low, high = mean_ci([0.90, 0.92, 0.91])
>>> round(mean, 3), round(low, 3), round(high, 3)
(0.91, 0.885, 0.935)
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["T_975", "clopper_pearson", "geometric_mean_ci", "mean_ci", "sd_ratio_ci"]

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def _t(df: int) -> float:
    return T_975[df - 1] if df <= len(T_975) else 1.96


def mean_ci(values: Sequence[float], bounds: tuple[float, float] | None = None) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its two-sided 95% t-interval (low = high = mean for one value).

    ``bounds``: the statistic's range (``(0, 1)`` for an accuracy); the interval is clipped to it,
    so it never claims values the statistic cannot take.

    >>> mean_ci([1.0, 0.95], bounds=(0, 1))[2]
    1.0
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci needs at least one value.")
    mean = sum(values) / n
    if n == 1:
        low = high = mean
    else:
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half = _t(n - 1) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
    if bounds is not None:
        low, high = float(max(low, bounds[0])), float(min(high, bounds[1]))
    return mean, low, high


def geometric_mean_ci(ratios: Sequence[float]) -> tuple[float, float, float]:
    """``(geometric mean, low, high)`` of positive ratios: the t-interval of their logarithms, exponentiated."""
    if any(r <= 0 for r in ratios):
        raise ValueError(f"geometric_mean_ci needs positive ratios, got {list(ratios)}.")
    mean, low, high = mean_ci([math.log(r) for r in ratios])
    return math.exp(mean), math.exp(low), math.exp(high)


def sd_ratio_ci(sd_a: float, df_a: int, sd_b: float, df_b: int) -> tuple[float, float, float]:
    """``(sd_a / sd_b, low, high)``: the 95% interval for a ratio of standard deviations from the
    F distribution of a ratio of sample variances (normal, independent samples)."""
    from scipy.stats import f  # scipy comes with scikit-learn (the lab extra)

    ratio = (sd_a / sd_b) ** 2
    return math.sqrt(ratio), math.sqrt(ratio / f.ppf(0.975, df_a, df_b)), math.sqrt(ratio / f.ppf(0.025, df_a, df_b))


def clopper_pearson(k: int, n: int) -> tuple[float, float, float]:
    """``(k / n, low, high)``: the exact two-sided 95% binomial interval.

    >>> [round(v, 3) for v in clopper_pearson(3, 3)]
    [1.0, 0.292, 1.0]
    """
    from scipy.stats import beta

    if n <= 0 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson needs 0 <= k <= n and n > 0, got k={k}, n={n}.")
    low = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return k / n, low, high
