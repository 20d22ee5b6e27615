"""Verdicts for the claims suite: a stated rule over a few seeds, never a bare comparison of means.

Every check looks at one quantity per seed (a paired difference for comparisons) and its two-sided 90%
Student-t interval, mean ± t₀.₉₅(n−1)·sd/√n (a one-sided 95% bound each way). With 3 seeds, t = 2.92.

- ``non_inferior(a, b, margin)`` "a scores at least b's": holds if the lower bound of a − b is above −margin;
  does not hold if the upper bound is below 0 (a is worse for sure); otherwise inconclusive.
- ``superior(a, b, margin)`` "a beats b": holds if the lower bound of a − b is above 0; does not hold if the
  upper bound is below ``margin`` (a cannot be better by a meaningful amount); otherwise inconclusive.
- ``above(x, threshold)`` / ``below(x, threshold)``: holds if the whole interval is on the claimed side;
  does not hold if it is wholly on the other side; otherwise inconclusive.
- ``contains(x, value)``: "x matches value": holds if value lies inside the interval and the interval's
  half-width is below ``max(|value|, margin)`` (an interval that wide says nothing); does not hold if
  value lies outside; otherwise inconclusive.

A claim holds if all its checks hold, does not hold if any check does not hold, and is inconclusive otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


@dataclass
class Interval:
    mean: float
    sd: float
    n: int
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def t_quantile(df: int, p: float = 0.95) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def interval(values) -> Interval:
    """Mean and two-sided 90% t interval of finite ``values`` (an unbounded interval for fewer than 2)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, math.nan, 0, -math.inf, math.inf)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, math.nan, 1, -math.inf, math.inf)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean, sd, n, mean - half, mean + half)


def paired(a, b) -> list[float]:
    return [x - y for x, y in zip(a, b) if x is not None and y is not None]


def non_inferior(a, b, margin: float) -> tuple[str, Interval]:
    ci = interval(paired(a, b))
    return (HOLDS if ci.low > -margin else FAILS if ci.high < 0 else UNSURE), ci


def superior(a, b, margin: float) -> tuple[str, Interval]:
    ci = interval(paired(a, b))
    return (HOLDS if ci.low > 0 else FAILS if ci.high < margin else UNSURE), ci


def above(x, threshold: float) -> tuple[str, Interval]:
    ci = interval(x)
    return (HOLDS if ci.low > threshold else FAILS if ci.high < threshold else UNSURE), ci


def below(x, threshold: float) -> tuple[str, Interval]:
    ci = interval(x)
    return (HOLDS if ci.high < threshold else FAILS if ci.low > threshold else UNSURE), ci


def contains(x, value: float, margin: float = 0.0) -> tuple[str, Interval]:
    ci = interval(x)
    if not math.isfinite(value) or ci.n == 0:
        return UNSURE, ci
    if not ci.low <= value <= ci.high:
        return FAILS, ci
    return (HOLDS if (ci.high - ci.low) / 2 < max(abs(value), margin) else UNSURE), ci


RULES = {"non_inferior": non_inferior, "superior": superior, "above": above, "below": below, "contains": contains}


def combine(verdicts) -> str:
    verdicts = list(verdicts)
    if verdicts and all(v == HOLDS for v in verdicts):
        return HOLDS
    return FAILS if FAILS in verdicts else UNSURE
