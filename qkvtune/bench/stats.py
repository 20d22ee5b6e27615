"""Statistics that hold at 3–5 seeds (claims suite v3, issue 25).

A claim compares arms scored per seed and per test example. Two things make a difference of scores uncertain:
the runs (seeds: initialisation, data order, dropout) and the finite test set (which examples happened to be
drawn). Write the per-example difference of two arms in seed s as D[s, i] = δ + u_s + v_i + w_si (a seed part,
an example part shared by every seed, and their interaction). Then

* the *seed part* comes from the per-seed differences d_s = score_a(s) − score_b(s) on the whole test set:
  var(d̄) ⊇ s²_d / n, with n − 1 degrees of freedom (a Student t part: with 3 seeds the percentile bootstrap over
  seeds cannot reach past the worst seed, and its interval covered ~62 % where 90 % was claimed);
* the *example part* comes from resampling the test examples (the same resampled examples for every seed and
  arm): the variance of the seed-mean difference over the replicates, less the interaction part the seed part
  already counts (var(w̄)/n, estimated from how the seeds' replicates move against their mean);
* the two are combined as se² = s²_d/n + var_examples with Welch–Satterthwaite degrees of freedom
  df = se⁴ (n − 1) / (s²_d/n)² (the example part has effectively infinite ones), and the interval is
  d̄ ± t₀.₉₅(df)·se — but never narrower than the seeds-only d̄ ± t₀.₉₅(n − 1)·s_d/√n: the degrees of freedom
  rise faster than the standard error when the example part is added (a part counted exact), and a test set
  cannot make the seeds' own spread more certain (v3's intervals were narrower than seeds-only in 8 of 9 cases).
  A simulation (tests/test_stats.py) holds the 90 % coverage to 88–93 % at 3 and at 5 seeds.

Power and "seeds needed" use the same interval: ``power`` at a standard error, df and half-width,
``seeds_needed`` by shrinking only the seed part (var_seeds·n/n′) and recomputing both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


def _scores(x: np.ndarray, metric: Callable | None, labels) -> np.ndarray:
    """Per-seed scores of (seeds, examples) rows: the mean, or ``metric(labels, row)`` per seed."""
    if metric is None:
        return x.mean(1)
    y = np.asarray(labels)
    return np.array([metric(y, row) for row in x])


def per_seed_differences(a: np.ndarray, b: np.ndarray, *, metric: Callable | None = None,
                         labels=None) -> np.ndarray:
    """score(a, seed s) − score(b, seed s) on the whole test set, per seed (paired seeds).

    ``a``, ``b``: (seeds, examples) arrays over the same test examples, per-example scores (0/1 correctness) or,
    with ``metric``, predictions that ``metric(labels, predictions)`` turns into one score (F1, Matthews,
    Pearson, a token-weighted loss)."""
    a, b = _check(a, b)
    return _scores(a, metric, labels) - _scores(b, metric, labels)


def _check(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"arms must be (seeds, examples) arrays of one shape (paired seeds, the same examples), "
                         f"got {a.shape} and {b.shape}")
    return a, b


def example_replicates(a: np.ndarray, b: np.ndarray, *, metric: Callable | None = None, labels=None,
                       reps: int = 1000, seed: int = 0) -> np.ndarray:
    """(reps, seeds): per-seed differences after resampling the test examples with replacement — the same
    resampled examples for every seed and both arms (they all answered the same questions)."""
    a, b = _check(a, b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.shape[1], (reps, a.shape[1]))
    if metric is None:  # a mean resampled is the examples' counts times their values: one matrix product
        reps, n = idx.shape
        counts = np.bincount((idx + n * np.arange(reps)[:, None]).ravel(), minlength=reps * n).reshape(reps, n)
        return counts @ (a - b).T / n
    y = np.asarray(labels)
    out = np.empty((reps, a.shape[0]))
    for r, e in enumerate(idx):
        out[r] = [metric(y[e], ra[e]) - metric(y[e], rb[e]) for ra, rb in zip(a, b)]
    return out


@dataclass
class Parts:
    """A mean difference over n seeds with its seed and example variance parts (see the module's text)."""

    mean: float
    var_seeds: float  # s²_d / n
    var_examples: float  # the test set's part, interaction removed
    n: int

    @property
    def se(self) -> float:
        return math.sqrt(self.var_seeds + self.var_examples) if self.n >= 2 else math.nan

    @property
    def df(self) -> float:
        return welch_df(self.var_seeds, self.var_examples, self.n)

    def bounds(self, alpha: float = 0.05) -> tuple[float, float]:
        """The two-sided (1 − 2α) t interval; its ends are one-sided α bounds. Unbounded below 2 seeds."""
        if self.n < 2 or not math.isfinite(self.mean):
            return -math.inf, math.inf
        half = half_width(self.var_seeds, self.var_examples, self.n, alpha)
        return self.mean - half, self.mean + half


def half_width(var_seeds: float, var_examples: float, n: int, alpha: float = 0.05) -> float:
    """t₁₋α(df)·se with Welch–Satterthwaite df, floored at the seeds-only t₁₋α(n − 1)·√var_seeds."""
    if n < 2:
        return math.inf
    se = math.sqrt(var_seeds + var_examples)
    return max(t_quantile(welch_df(var_seeds, var_examples, n), 1 - alpha) * se,
               t_quantile(n - 1, 1 - alpha) * math.sqrt(var_seeds))


def welch_df(var_seeds: float, var_examples: float, n: int) -> float:
    """Welch–Satterthwaite degrees of freedom of var_seeds (n − 1 df) + var_examples (infinite df)."""
    if n < 2:
        return math.nan
    if var_seeds <= 0:
        return math.inf
    return (var_seeds + var_examples) ** 2 * (n - 1) / var_seeds ** 2


def parts(d: np.ndarray, replicates: np.ndarray | None = None) -> Parts:
    """Combine per-seed differences ``d`` (n,) and example ``replicates`` (reps, n) of them (None: no test-set
    part, e.g. a quantity measured once per seed)."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    var_seeds = float(d.var(ddof=1) / n) if n >= 2 else math.nan
    var_examples = 0.0
    if replicates is not None and n >= 1:
        r = np.asarray(replicates, dtype=float)
        rbar = r.mean(1)
        var_examples = float(rbar.var(ddof=1))
        if n >= 2:  # the seeds' spread around their mean under resampling: the interaction the seed part counts
            interaction = float(np.mean(np.var(r - rbar[:, None], axis=0, ddof=1)))
            var_examples = max(var_examples - interaction / (n - 1), 0.0)
    return Parts(mean, var_seeds, var_examples, n)


def t_quantile(df: float, p: float = 0.95) -> float:
    from scipy.stats import norm, t

    return float(norm.ppf(p)) if not math.isfinite(df) else float(t.ppf(p, df))


def t_cdf(x: float, df: float) -> float:
    from scipy.stats import norm, t

    return float(norm.cdf(x)) if not math.isfinite(df) else float(t.cdf(x, df))


def pass_probability(rule: str, margin: float, se: float, df: float, alpha: float = 0.05,
                     half: float | None = None) -> float:
    """P(the check passes) when the estimate is truth + se·T_df and the interval is d ± h (``half``; default
    t₁₋α(df)·se): ``at_least`` with truly equal arms, ``better`` with arms truly ``margin`` apart (both
    1 − F(h/se − m/se)), ``equivalent`` with truly equal arms (2F(m/se − h/se) − 1, 0 when the interval alone is
    wider than the margin)."""
    if not (se > 0) or not math.isfinite(se):
        return 1.0 if se == 0 else math.nan
    q = t_quantile(df, 1 - alpha) if half is None else half / se
    if rule == "equivalent":
        return max(0.0, 2 * t_cdf(margin / se - q, df) - 1)
    return 1 - t_cdf(q - margin / se, df)
