"""Verdicts for the claims suite: a stated rule per check, never a bare comparison of means.

Scores (``score:<arm>``) are compared on the test split by a bootstrap over seeds *and* test examples
(``stats.py``; 2,000 replicates, seeds paired across arms, the same resampled examples for every arm and seed;
with several tasks, the mean over tasks). Other quantities (steps to target, φ, amplification factors,
slopes, task-vector retention) have one value per seed and a two-sided 90% Student-t interval,
mean ± t₀.₉₅(n−1)·sd/√n. Either way the interval's ends are one-sided 95% bounds, and a difference d = a − b is
judged by:

- ``at_least(a, b, margin)`` "a is at least as good as b" (non-inferiority): holds if the lower bound of d is
  above −margin; does not hold if the upper bound is below −margin; otherwise inconclusive.
- ``better(a, b, margin)`` "a beats b": holds if the lower bound of d is above 0; does not hold if the upper
  bound is below ``margin`` (a cannot be better by a meaningful amount); otherwise inconclusive.
- ``equivalent(a, b, margin)`` "a matches b" (two one-sided tests): holds if the whole interval lies inside
  (−margin, margin); does not hold if it lies wholly outside; otherwise inconclusive. A wide interval never
  passes. With ``b`` a number (or absent: 0) the same on a − b.
- ``above(a, threshold)`` / ``below(a, threshold)``: holds if the whole interval is on the claimed side; does
  not hold if it is wholly on the other side; otherwise inconclusive.

Power (comparisons): how often the check would pass if the arms were truly equal (``at_least``,
``equivalent``) or truly ``margin`` apart (``better``), from the interval's standard error; the seeds it
would take to reach 80% follow from splitting that error into its seed and test-example parts.

A check whose arms were both "not learned" on every testable task (test score within the suite's margin of
the best constant predictor) is inconclusive, whatever its numbers. A claim's verdict lists its parts: it
holds if every part holds, does not hold if every part does not hold, is inconclusive if none decided, and
is *mixed* otherwise — one broken part does not decide for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
UNTESTABLE = "not testable at this budget"
MIXED = "mixed"
COMPARISONS = ("at_least", "better", "equivalent")
RULES = COMPARISONS + ("above", "below")


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    se: float = math.nan
    n: int = 0
    how: str = "t"  # t | bootstrap

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def t_quantile(df: int, p: float = 0.95) -> float:
    from scipy.stats import t

    return float(t.ppf(p, df))


def t_interval(values) -> Interval:
    """Mean and two-sided 90% t interval of finite ``values`` (unbounded for fewer than 2)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return Interval(math.nan, -math.inf, math.inf, math.nan, 0)
    mean = sum(xs) / n
    if n == 1:
        return Interval(mean, -math.inf, math.inf, math.nan, 1)
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(n - 1) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, sd / math.sqrt(n), n)


def judge(rule: str, ci: Interval, margin: float = 0.0, threshold: float | None = None) -> str:
    lo, hi = ci.low, ci.high
    if not (math.isfinite(ci.mean)):
        return UNSURE
    if rule == "at_least":
        return HOLDS if lo > -margin else FAILS if hi < -margin else UNSURE
    if rule == "better":
        return HOLDS if lo > 0 else FAILS if hi < margin else UNSURE
    if rule == "equivalent":
        return HOLDS if -margin < lo and hi < margin else FAILS if hi < -margin or lo > margin else UNSURE
    if rule == "above":
        return HOLDS if lo > threshold else FAILS if hi < threshold else UNSURE
    if rule == "below":
        return HOLDS if hi < threshold else FAILS if lo > threshold else UNSURE
    raise ValueError(f"unknown rule {rule!r}")


def power(rule: str, se: float, margin: float, alpha: float = 0.05) -> float:
    """P(the check passes) for truly equal arms (at_least, equivalent) or arms truly ``margin`` apart (better),
    with the estimate ~ N(truth, se²) (normal approximation of the interval)."""
    from .stats import equivalence_power, normal_cdf, normal_quantile

    if rule not in COMPARISONS or not math.isfinite(se) or margin <= 0:
        return math.nan
    if rule == "equivalent":
        return equivalence_power(margin, se, alpha)
    return normal_cdf(margin / se - normal_quantile(1 - alpha)) if se > 0 else 1.0


def seeds_needed(rule: str, se: float, se_examples: float, n_seeds: int, margin: float, target: float = 0.8,
                 most: int = 50) -> int | None:
    """Seeds per arm at which ``power`` reaches ``target``: se² = se_seeds²·n₀/n + se_examples² (the seed part
    shrinks with more seeds, the test-set part does not). None if ``most`` seeds do not reach it."""
    seed_var = max(se ** 2 - se_examples ** 2, 0.0) * n_seeds
    for n in range(2, most + 1):
        if power(rule, math.sqrt(seed_var / n + se_examples ** 2), margin) >= target:
            return n
    return None


def combine(verdicts) -> str:
    verdicts = [v for v in verdicts if v != UNTESTABLE]
    if not verdicts:
        return UNTESTABLE
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    if all(v == UNSURE for v in verdicts):
        return UNSURE
    return MIXED
