"""Statistics that can say "equal" and count all the noise (claims suite v2, issue 13).

A claim compares arms scored per seed and per test example. Two things make a score uncertain: the runs
(seeds: initialisation, data order) and the finite test set (which examples happened to be drawn). The
bootstrap here resamples both: in each replicate, seeds with replacement (the same seed indices for every
arm when seeds are paired, as when a seed fixes the data order of every arm) and test examples with
replacement (the same examples for every arm and seed: they all answered the same questions).

``interval`` gives the (1 − 2α) percentile interval of the replicates, whose ends are one-sided α bounds;
the rules that judge it (at least, better, equivalent by two one-sided tests) are in ``verdicts.py``.
``equivalence_power`` says how often two truly equal arms would pass the equivalence test at a standard error
(normal approximation of the bootstrap interval), so a report can state each check's power.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

def bootstrap_difference(a: np.ndarray, b: np.ndarray, *, metric: Callable | None = None,
                         labels: np.ndarray | None = None, paired_seeds: bool = True, reps: int = 2000,
                         seed: int = 0, resample_seeds: bool = True) -> np.ndarray:
    """``reps`` bootstrap replicates of score(a) − score(b).

    ``a``, ``b``: (seeds, examples) arrays over the same test examples, per-example scores (0/1 correctness,
    a loss) or, with ``metric``, predictions that ``metric(labels, predictions)`` turns into one score per seed
    (F1, Matthews, Pearson). An arm's score is the mean over its seeds of the per-seed score.
    ``resample_seeds=False`` keeps every seed and resamples examples only: the test-set part of the noise."""
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
        if resample_seeds:
            sa = rng.integers(0, a.shape[0], a.shape[0])
            sb = sa if paired_seeds else rng.integers(0, b.shape[0], b.shape[0])
        else:
            sa, sb = np.arange(a.shape[0]), np.arange(b.shape[0])
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


def normal_cdf(x: float) -> float:
    """Φ(x) of the standard normal."""
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def normal_quantile(p: float) -> float:
    """Φ⁻¹(p) of the standard normal."""
    from scipy.stats import norm

    return float(norm.ppf(p))


def equivalence_power(margin: float, se: float, alpha: float = 0.05) -> float:
    """P(two truly equal arms pass ``equivalent``) when the estimated difference is N(0, se²) and the interval
    is d ± z₁₋α·se: P(|d| < margin − z·se) = 2Φ(margin/se − z) − 1 (0 when the interval alone is wider)."""
    if se <= 0:
        return 1.0
    return max(0.0, 2 * normal_cdf(margin / se - normal_quantile(1 - alpha)) - 1)
