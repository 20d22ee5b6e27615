"""Sample-size study helpers: a geometric grid of training-set sizes and the log-log slope of the error,
to compare with the excess-risk exponent the kernel's eigen-decay predicts (``ntk.rate_from_decay``)."""

from __future__ import annotations

import math

from . import AnalysisError


def geometric_grid(n_min: int, n_max: int, points: int) -> list[int]:
    """About ``points`` sizes from n_min to n_max, equally spaced in log n (duplicates after rounding merge)."""
    if not 0 < n_min <= n_max or points < 2:
        raise AnalysisError(f"--grid: need 0 < n_min <= n_max and >= 2 points, got {n_min}:{n_max}:{points}")
    r = (n_max / n_min) ** (1 / (points - 1))
    return sorted({int(round(n_min * r ** i)) for i in range(points)})


def fit_slope(ns, errors) -> float:
    """Least-squares slope of log(error) on log(n) (errors ≤ 0 are skipped)."""
    pts = [(math.log(n), math.log(e)) for n, e in zip(ns, errors) if e > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den > 0 else math.nan
