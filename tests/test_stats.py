"""The claims suite's statistics against closed forms and simulation: the two-level bootstrap's spread equals
the known variance of seed noise plus test-sampling noise; TOST passes equal arms and never a wide interval;
the stated power is the rate at which truly equal arms pass."""

import math

import numpy as np
import pytest

from qkvtune.bench import stats


def _arms(rng, n_seeds, n_examples, sd_seed, p=0.7, shift=0.0):
    """Per-example 0/1 correctness of two arms on the same examples: each example has its own difficulty
    (shared by both arms), each run adds its own seed offset to the accuracy."""
    difficulty = rng.uniform(0, 1, n_examples)
    def arm(delta):
        offsets = rng.normal(0, sd_seed, (n_seeds, 1))
        return (difficulty[None, :] < np.clip(p + delta + offsets, 0, 1)).astype(float)
    return arm(shift), arm(0.0)


def test_bootstrap_spread_counts_seed_and_example_noise():
    """Arms that differ only through seed noise: the bootstrap sd of the difference matches the seed-level
    closed form; with one seed per arm the example-level disagreement is all that remains, and resampling
    the examples must see it."""
    rng = np.random.default_rng(0)
    n_seeds, sd_seed = 8, 0.03
    a, b = _arms(rng, n_seeds, 4000, sd_seed)
    diffs = stats.bootstrap_difference(a, b, reps=800, seed=1, paired_seeds=False)
    per_seed_a, per_seed_b = a.mean(1), b.mean(1)
    expected = math.sqrt(per_seed_a.var(ddof=0) / n_seeds + per_seed_b.var(ddof=0) / n_seeds)
    assert diffs.std() == pytest.approx(expected, rel=0.25)
    # test-sampling noise alone: one seed each, two different predictors on the same examples
    x = (rng.uniform(size=(1, 500)) < 0.7).astype(float)
    y = (rng.uniform(size=(1, 500)) < 0.7).astype(float)
    d = stats.bootstrap_difference(x, y, reps=800, seed=2)
    closed = math.sqrt(np.var(x[0] - y[0]) / 500)
    assert d.std() == pytest.approx(closed, rel=0.15)


def test_bootstrap_with_a_metric_over_predictions():
    from sklearn.metrics import matthews_corrcoef

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    good = np.where(rng.uniform(size=(3, 300)) < 0.85, labels, 1 - labels)
    bad = np.where(rng.uniform(size=(3, 300)) < 0.6, labels, 1 - labels)
    d = stats.bootstrap_difference(good, bad, metric=matthews_corrcoef, labels=labels, reps=50)
    point = np.mean([matthews_corrcoef(labels, g) for g in good]) - np.mean([matthews_corrcoef(labels, b) for b in bad])
    assert abs(np.median(d) - point) < 0.05 and stats.better(d, 0.1)[0] == stats.HOLDS


def test_rules():
    rng = np.random.default_rng(4)
    assert stats.equivalent(rng.normal(0, 0.005, 4000), margin=0.02)[0] == stats.HOLDS
    assert stats.equivalent(rng.normal(0.05, 0.005, 4000), margin=0.02)[0] == stats.FAILS
    wide = rng.normal(0, 0.2, 4000)  # covers 0, says nothing: never "equal"
    assert stats.equivalent(wide, margin=0.02)[0] == stats.UNSURE
    assert stats.at_least(rng.normal(-0.01, 0.004, 4000), margin=0.02)[0] == stats.HOLDS
    assert stats.at_least(rng.normal(-0.05, 0.004, 4000), margin=0.02)[0] == stats.FAILS
    assert stats.better(rng.normal(0.05, 0.01, 4000), margin=0.02)[0] == stats.HOLDS
    assert stats.better(rng.normal(0.0, 0.005, 4000), margin=0.02)[0] == stats.FAILS


def test_power_is_the_pass_rate_of_truly_equal_arms():
    """Simulate the rule the report applies (estimate ± z·se inside ±margin) for equal arms; the closed form
    must give the observed pass rate."""
    rng = np.random.default_rng(5)
    z = 1.6448536269514722
    for margin, se in [(0.02, 0.005), (0.02, 0.01), (0.03, 0.008), (0.01, 0.01)]:
        d = rng.normal(0, se, 200_000)
        observed = np.mean(np.abs(d) + z * se < margin)
        assert stats.equivalence_power(margin, se) == pytest.approx(observed, abs=0.005)
    assert stats.equivalence_power(0.01, 0.01) == 0.0  # the interval alone is wider than the margin


def test_seeds_for_power():
    n = stats.seeds_for_power(margin=0.02, sd_seed=0.01, power=0.8)
    se = stats.difference_se(0.01, n)
    assert stats.equivalence_power(0.02, se) >= 0.8
    assert stats.equivalence_power(0.02, stats.difference_se(0.01, n - 1)) < 0.8
    # test-set noise that alone exceeds the margin: no number of seeds helps
    assert stats.seeds_for_power(margin=0.01, sd_seed=0.01, sd_example=0.5, n_examples=100) is None
