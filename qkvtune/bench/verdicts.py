"""Verdicts for the claims suite: a stated rule per check, never a bare comparison of means.

Scores (``score:<arm>``) are compared on the test split: per seed, the difference of the two arms' test scores
(seeds paired: the same seed gives both arms their data order), and a t interval whose seed part has n − 1
degrees of freedom and whose test-set part comes from resampling the test examples (the same resampled examples
for every arm and seed), never narrower than the seeds-only t(n − 1) interval (``stats.py``, held to 88–93 %
coverage of its nominal 90 % at 3 and 5 seeds by simulation); with several tasks, the mean over tasks. Scores judged by a loss (lower is better) are compared as
the gain b − a, so every rule below reads "a is better". Other quantities (steps to target, φ, amplification
factors, slopes, task-vector retention) have one value per seed and a two-sided 90 % Student-t interval,
mean ± t₀.₉₅(n−1)·sd/√n. Either way the interval's ends are one-sided 95 % bounds, and a difference d = a − b
is judged by:

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
``equivalent``) or truly ``margin`` apart (``better``), from the same t (its standard error and degrees of
freedom); the seeds it would take to reach 80 % shrink only the seed part of the error (var_seeds·n/n′) and
recompute the degrees of freedom.

Before a score comparison is read, each of its arms must have learned: an arm whose test score does not beat
its own run with ΔW removed (the task head as trained, the same t interval on the per-seed differences) is
"adapter not learned", and every part that compares its score is not testable. A check whose arms were both
within the suite's margin of the best constant predictor on every testable task is inconclusive, whatever its
numbers. A claim's verdict lists its parts: it holds if every part holds, does not hold if every part does not
hold, is inconclusive if none decided, and is *mixed* otherwise — one broken part does not decide for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
UNTESTABLE = "not testable at this budget"
NOT_RUN = "not run in this profile"  # a part whose arm or task the profile leaves out
UNREAD = (UNTESTABLE, NOT_RUN)  # parts with no reading: left out of a claim's verdict
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
    how: str = "t"  # t (one value per seed) | t, seeds + examples (test scores)
    df: float = math.nan

    def __str__(self) -> str:
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]"


def t_interval(values) -> Interval:
    """Mean and two-sided 90% t interval of finite ``values`` (n − 1 df; unbounded for fewer than 2)."""
    from .stats import parts

    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return Interval(math.nan, -math.inf, math.inf, math.nan, 0)
    p = parts(xs)
    low, high = p.bounds()
    return Interval(p.mean, low, high, p.se, p.n, "t", p.df)


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


def power(rule: str, se: float, margin: float, df: float = math.inf, alpha: float = 0.05,
          half: float | None = None) -> float:
    """P(the check passes) for truly equal arms (at_least, equivalent) or arms truly ``margin`` apart (better),
    with the estimate ~ truth + se·T_df and the interval's half-width ``half`` (default t(df)·se;
    ``stats.pass_probability``)."""
    from .stats import pass_probability

    if rule not in COMPARISONS or not math.isfinite(se) or margin <= 0:
        return math.nan
    return pass_probability(rule, margin, se, df, alpha, half)


def seeds_needed(rule: str, var_seeds: float, var_examples: float, n_seeds: int, margin: float,
                 target: float = 0.8, most: int = 50) -> int | None:
    """Seeds per arm at which ``power`` reaches ``target``: the seed part shrinks as var_seeds·n/n′, the test-set
    part does not, and the degrees of freedom follow (Welch–Satterthwaite). None if ``most`` seeds do not
    reach it."""
    from .stats import half_width, welch_df

    if not (math.isfinite(var_seeds) and math.isfinite(var_examples)) or n_seeds < 2:
        return None
    for n in range(2, most + 1):
        vs = var_seeds * n_seeds / n
        if power(rule, math.sqrt(vs + var_examples), margin, welch_df(vs, var_examples, n),
                 half=half_width(vs, var_examples, n)) >= target:
            return n
    return None


def combine(verdicts) -> str:
    given = list(verdicts)
    verdicts = [v for v in given if v not in UNREAD]
    if not verdicts:
        return NOT_RUN if given and all(v == NOT_RUN for v in given) else UNTESTABLE
    if all(v == HOLDS for v in verdicts):
        return HOLDS
    if all(v == FAILS for v in verdicts):
        return FAILS
    if all(v == UNSURE for v in verdicts):
        return UNSURE
    return MIXED
