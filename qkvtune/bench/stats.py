"""Statistics that can say "equal" and count all the noise (claims suite v2, issue 13).

A claim compares arms scored per seed and per test example. Two things make a score uncertain: the runs
(seeds: initialisation, data order) and the finite test set (which examples happened to be drawn). The
bootstrap here resamples both: in each replicate, seeds with replacement (the same seed indices for every
arm when seeds are paired, as when a seed fixes the data order of every arm) and test examples with
replacement (the same examples for every arm and seed: they all answered the same questions).

Rules over the bootstrap distribution of a difference d = a − b, at level α (one-sided):

- ``equivalent(d, margin)``: two one-sided tests (TOST): holds when the (1 − 2α) interval lies inside
  (−margin, +margin); does not hold when it lies wholly outside; otherwise inconclusive. A wide interval can
  never pass (unlike "the interval covers 0").
- ``at_least(d, margin)``: non-inferiority: holds when the lower α bound is above −margin; does not hold when
  the upper bound is below −margin; otherwise inconclusive.
- ``better(d, margin)``: superiority: holds when the lower bound is above 0; does not hold when the upper bound is
  below ``margin``; otherwise inconclusive.

``equivalence_power`` says how often two truly equal arms would pass ``equivalent`` at a number of seeds
(normal approximation of the bootstrap interval), so a report can state each check's power and pick enough seeds.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"


def bootstrap_difference(a: np.ndarray, b: np.ndarray, *, metric: Callable | None = None,
                         labels: np.ndarray | None = None, paired_seeds: bool = True, reps: int = 2000,
                         seed: int = 0) -> np.ndarray:
    """``reps`` bootstrap replicates of score(a) − score(b).

    ``a``, ``b``: (seeds, examples) arrays over the same test examples, per-example scores (0/1 correctness,
    a loss) or, with ``metric``, predictions that ``metric(labels, predictions)`` turns into one score per seed
    (F1, Matthews, Pearson). An arm's score is the mean over its seeds of the per-seed score."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"arms must be (seeds, examples) over the same examples, got {a.shape} and {b.shape}")
    if paired_seeds and a.shape[0] != b.shape[0]:
        raise ValueError("paired seeds need the same number of seeds in both arms")
    rng = np.random.default_rng(seed)
    n_examples = a.shape[1]
    out = np.empty(reps)
    for r in range(reps):
        e = rng.integers(0, n_examples, n_examples)
        sa = rng.integers(0, a.shape[0], a.shape[0])
        sb = sa if paired_seeds else rng.integers(0, b.shape[0], b.shape[0])
        out[r] = _score(a[sa][:, e], metric, labels, e) - _score(b[sb][:, e], metric, labels, e)
    return out


def _score(x: np.ndarray, metric, labels, e) -> float:
    if metric is None:
        return float(x.mean())
    y = np.asarray(labels)[e]
    return float(np.mean([metric(y, row) for row in x]))  # sklearn's order: (y_true, y_pred)


def interval(samples: np.ndarray, alpha: float = 0.05) -> tuple[float, float]:
    """The (1 − 2α) percentile interval: its ends are the one-sided α bounds."""
    low, high = np.quantile(np.asarray(samples), [alpha, 1 - alpha])
    return float(low), float(high)


def equivalent(samples: np.ndarray, margin: float, alpha: float = 0.05) -> tuple[str, tuple[float, float]]:
    low, high = interval(samples, alpha)
    if -margin < low and high < margin:
        return HOLDS, (low, high)
    if high < -margin or low > margin:
        return FAILS, (low, high)
    return UNSURE, (low, high)


def at_least(samples: np.ndarray, margin: float, alpha: float = 0.05) -> tuple[str, tuple[float, float]]:
    low, high = interval(samples, alpha)
    return (HOLDS if low > -margin else FAILS if high < -margin else UNSURE), (low, high)


def better(samples: np.ndarray, margin: float, alpha: float = 0.05) -> tuple[str, tuple[float, float]]:
    low, high = interval(samples, alpha)
    return (HOLDS if low > 0 else FAILS if high < margin else UNSURE), (low, high)


def _phi(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _z(p: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(p))


def difference_se(sd_seed: float, n_seeds: int, sd_example: float = 0.0, n_examples: int | None = None) -> float:
    """Standard error of a difference of two arms' means: seed noise of each arm (sd_seed per run, over
    ``n_seeds`` runs each) and the test-sampling noise of the per-example score difference (sd_example over
    ``n_examples`` shared examples)."""
    var = 2 * sd_seed ** 2 / n_seeds
    if sd_example and n_examples:
        var += sd_example ** 2 / n_examples
    return math.sqrt(var)


def equivalence_power(margin: float, se: float, alpha: float = 0.05) -> float:
    """P(two truly equal arms pass ``equivalent``) when the estimated difference is N(0, se²) and the interval
    is d ± z₁₋α·se: P(|d| < margin − z·se) = 2Φ(margin/se − z) − 1 (0 when the interval alone is wider)."""
    if se <= 0:
        return 1.0
    return max(0.0, 2 * _phi(margin / se - _z(1 - alpha)) - 1)


def seeds_for_power(margin: float, sd_seed: float, power: float = 0.8, alpha: float = 0.05, sd_example: float = 0.0,
                    n_examples: int | None = None, most: int = 50) -> int | None:
    """The fewest seeds per arm at which ``equivalent`` has ``power`` for truly equal arms (None if ``most``
    seeds do not reach it: the test-set noise alone may be too large for the margin)."""
    for n in range(2, most + 1):
        if equivalence_power(margin, difference_se(sd_seed, n, sd_example, n_examples), alpha) >= power:
            return n
    return None
