"""The claims suite's statistics against closed forms and simulation: the two-level bootstrap's spread equals
the known variance of seed noise plus test-sampling noise; TOST passes equal arms and never a wide interval;
the stated power is the rate at which truly equal arms pass."""

import math

import numpy as np
import pytest

from qkvtune.bench import stats
from qkvtune.bench import verdicts as V


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
    assert abs(np.median(d) - point) < 0.05 and _judge("better", d, 0.1) == V.HOLDS


def _judge(rule, replicates, margin):
    low, high = stats.interval(replicates)
    return V.judge(rule, V.Interval(float(np.mean(replicates)), low, high), margin)


def test_rules_on_bootstrap_replicates():
    rng = np.random.default_rng(4)
    assert _judge("equivalent", rng.normal(0, 0.005, 4000), 0.02) == V.HOLDS
    assert _judge("equivalent", rng.normal(0.05, 0.005, 4000), 0.02) == V.FAILS
    wide = rng.normal(0, 0.2, 4000)  # covers 0, says nothing: never "equal"
    assert _judge("equivalent", wide, 0.02) == V.UNSURE
    assert _judge("at_least", rng.normal(-0.01, 0.004, 4000), 0.02) == V.HOLDS
    assert _judge("at_least", rng.normal(-0.05, 0.004, 4000), 0.02) == V.FAILS
    assert _judge("better", rng.normal(0.05, 0.01, 4000), 0.02) == V.HOLDS
    assert _judge("better", rng.normal(0.0, 0.005, 4000), 0.02) == V.FAILS


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


def test_task_metrics_for_the_bootstrap_equal_sklearn_and_scipy():
    from scipy.stats import pearsonr
    from sklearn.metrics import f1_score, matthews_corrcoef

    from qkvtune.data import metrics

    rng = np.random.default_rng(0)
    for _ in range(5):
        y, p = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
        assert metrics.f1_of(y, p) == pytest.approx(f1_score(y, p))
        assert metrics.matthews_of(y, p) == pytest.approx(matthews_corrcoef(y, p))
        a, b = rng.normal(size=40), rng.normal(size=40)
        assert metrics.pearson_of(a, b) == pytest.approx(pearsonr(b, a)[0])
    assert metrics.matthews_of([0, 1, 1], [1, 1, 1]) == 0.0 and metrics.f1_of([0, 0], [0, 0]) == 0.0


def test_constant_predictor_and_gate():
    from qkvtune.bench import scores

    labels = [1] * 68 + [0] * 32  # MRPC-like: always answering "paraphrase"
    assert scores.constant_score("glue/sst2", labels) == pytest.approx(0.68)
    assert scores.constant_score("glue/mrpc", labels) == pytest.approx(2 * 0.68 / 1.68)  # F1 of all-positive
    assert scores.constant_score("glue/cola", labels) == 0.0 and scores.constant_score("glue/stsb", [0.1, 2.0]) == 0.0
    assert scores.constant_score("commonsense/arc", ["A", "B", "B"], ["A", "B", "C", "D"]) == pytest.approx(2 / 3)
    rule = {"over_constant": 0.10, "matthews_correlation": 0.2, "pearson": 0.5}
    # MRPC's gate reads accuracy, not the F1 any constant already scores well on
    assert scores.gate("glue/mrpc", {"eval_accuracy": 0.77, "eval_f1": 0.85}, labels, None, rule)[0] is False
    assert scores.gate("glue/mrpc", {"eval_accuracy": 0.79, "eval_f1": 0.85}, labels, None, rule)[0] is True
    assert scores.gate("glue/cola", {"eval_matthews_correlation": 0.19}, labels, None, rule)[0] is False
    assert scores.gate("glue/stsb", {"eval_pearson": 0.51}, [0.1, 0.2], None, rule)[0] is True
    # generation: over max(chance, the most frequent answer)
    answers = ["true"] * 6 + ["false"] * 4
    assert scores.gate("commonsense/boolq", {"eval_accuracy": 0.65}, answers, ["false", "true"], rule)[0] is False
    assert scores.gate("commonsense/boolq", {"eval_accuracy": 0.71}, answers, ["false", "true"], rule)[0] is True
