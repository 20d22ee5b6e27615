"""The claims suite's statistics against closed forms and simulation: nominal 90 % intervals (a t seed part with
n − 1 degrees of freedom plus the test-example part) cover 88–92 % at 3 and at 5 seeds; the stated power is the
rate at which the check passes; the parts equal their closed forms."""

import math

import numpy as np
import pytest

from qkvtune.bench import stats
from qkvtune.bench import verdicts as V


def _arms(rng, n_seeds, n_examples, mu_a=0.3, mu_b=0.0, sd_seed=0.15, rho=0.5):
    """Per-example 0/1 correctness of two arms on the same test examples: each example has its own difficulty
    (shared by every run), each run its own offset (paired seeds correlate by ``rho``), and each answer is a
    draw given both (the seed × example interaction: runs disagree on hard examples)."""
    theta = rng.normal(1.5, 1.5, n_examples)
    z = rng.normal(size=(2, n_seeds))
    ua, ub = sd_seed * z[0], sd_seed * (rho * z[0] + math.sqrt(1 - rho ** 2) * z[1])
    p = lambda mu, u: 1 / (1 + np.exp(-(theta[None] + mu + u[:, None])))
    return ((rng.uniform(size=(n_seeds, n_examples)) < p(mu_a, ua)).astype(float),
            (rng.uniform(size=(n_seeds, n_examples)) < p(mu_b, ub)).astype(float))


def _truth(mu_a=0.3, mu_b=0.0, sd_seed=0.15, m=2_000_000):
    """The difference over the population of examples and of runs (what the interval should cover)."""
    r = np.random.default_rng(123)
    theta = r.normal(1.5, 1.5, m)
    s = lambda mu: 1 / (1 + np.exp(-(theta + mu + sd_seed * r.normal(size=m))))
    return float(np.mean(s(mu_a) - s(mu_b)))


@pytest.mark.parametrize("sd_seed", [0.05, 0.3])
@pytest.mark.parametrize("n_seeds", [3, 5])
def test_nominal_90_percent_intervals_cover_88_to_93_percent(n_seeds, sd_seed):
    """Per-seed differences (t with n − 1 df) plus resampled test examples, combined: 2,000 simulated
    comparisons; the truth is the population difference. A seed part taken from a percentile bootstrap over 3
    seeds covered ~62 %; the example part without removing the interaction over-covers (94–98 %). The floor at
    the seeds-only interval costs at most ~1 point of over-coverage here."""
    rng = np.random.default_rng(n_seeds * 10 + int(sd_seed * 100))
    truth, hits, sims = _truth(sd_seed=sd_seed), 0, 2000
    for k in range(sims):
        a, b = _arms(rng, n_seeds, 500, sd_seed=sd_seed)
        d = stats.per_seed_differences(a, b)
        low, high = stats.parts(d, stats.example_replicates(a, b, reps=300, seed=k)).bounds()
        hits += low <= truth <= high
    assert 0.88 <= hits / sims <= 0.93


def test_parts_are_their_closed_forms():
    rng = np.random.default_rng(0)
    a, b = _arms(rng, 4, 800)
    d = stats.per_seed_differences(a, b)
    assert d == pytest.approx(a.mean(1) - b.mean(1))
    reps = stats.example_replicates(a, b, reps=2000, seed=1)
    p = stats.parts(d, reps)
    assert p.var_seeds == pytest.approx(np.var(d, ddof=1) / 4) and p.n == 4
    # identical seeds: no interaction, the example part is the plain variance of a mean of per-example differences
    same = np.repeat(a[:1], 3, axis=0), np.repeat(b[:1], 3, axis=0)
    q = stats.parts(stats.per_seed_differences(*same), stats.example_replicates(*same, reps=4000, seed=2))
    closed = np.var(same[0][0] - same[1][0]) / 800
    assert q.var_seeds == 0 and q.var_examples == pytest.approx(closed, rel=0.1) and q.df == math.inf
    # Welch–Satterthwaite: all seed noise -> n − 1 df; the example part adds degrees of freedom
    assert stats.welch_df(1.0, 0.0, 3) == 2 and stats.welch_df(1.0, 1.0, 3) == 8
    assert stats.parts([0.1]).bounds() == (-math.inf, math.inf)  # one seed says nothing


@pytest.mark.parametrize("ratio", [0.0, 0.05, 0.3, 1.0, 3.0, 30.0])
def test_an_interval_is_never_narrower_than_the_seeds_only_t(ratio):
    """Adding the test-set part raises the Welch–Satterthwaite df faster than the standard error when it is small
    (v3: 8 of 9 combined intervals narrower than seeds-only); the interval is floored at t(n − 1)·s_d/√n and is
    the combined t(df)·se where that is wider."""
    d = np.array([0.02, 0.05, 0.11])
    seeds_only = stats.parts(d).bounds()
    assert seeds_only[1] - d.mean() == pytest.approx(stats.t_quantile(2) * d.std(ddof=1) / math.sqrt(3))
    vs = d.var(ddof=1) / 3
    p = stats.Parts(float(d.mean()), vs, ratio * vs, 3)
    low, high = p.bounds()
    assert low <= seeds_only[0] + 1e-15 and high >= seeds_only[1] - 1e-15
    combined = stats.t_quantile(p.df) * p.se
    assert (high - low) / 2 == pytest.approx(max(combined, seeds_only[1] - d.mean()))
    if ratio == 0.05:  # the case v3 got wrong: df 2 -> 2.2, se +2.5 %, t 2.92 -> 2.77: narrower without the floor
        assert combined < seeds_only[1] - d.mean() and (high - low) / 2 == pytest.approx(seeds_only[1] - d.mean())
    if ratio == 30.0:  # the example part dominates: the combined interval is the wider
        assert (high - low) / 2 == pytest.approx(combined) and combined > seeds_only[1] - d.mean()


def test_example_replicates_with_a_metric_match_the_mean_path():
    from qkvtune.data.metrics import matthews_of

    rng = np.random.default_rng(3)
    a, b = _arms(rng, 3, 200)
    plain = stats.example_replicates(a, b, reps=50, seed=4)
    through = stats.example_replicates(a, b, metric=lambda y, p: float(np.mean(p)), labels=np.zeros(200),
                                       reps=50, seed=4)
    assert through == pytest.approx(plain)
    labels = rng.integers(0, 2, 300)
    good = np.where(rng.uniform(size=(3, 300)) < 0.85, labels, 1 - labels)
    bad = np.where(rng.uniform(size=(3, 300)) < 0.6, labels, 1 - labels)
    d = stats.per_seed_differences(good, bad, metric=matthews_of, labels=labels)
    p = stats.parts(d, stats.example_replicates(good, bad, metric=matthews_of, labels=labels, reps=200))
    low, _ = p.bounds()
    assert low > 0.3 and V.judge("better", V.Interval(p.mean, *p.bounds()), 0.1) == V.HOLDS


def test_power_is_the_pass_rate_of_the_t_rule():
    """Simulate the rule the report applies (estimate ± t·se against the margin) with estimates distributed as
    truth + se·T_df; the closed form must give the observed pass rate."""
    from scipy.stats import t as tdist

    rng = np.random.default_rng(5)
    for rule, margin, se, df in [("equivalent", 0.02, 0.005, 2), ("equivalent", 0.03, 0.008, 8),
                                 ("at_least", 0.02, 0.01, 2), ("at_least", 0.02, 0.01, math.inf),
                                 ("better", 0.03, 0.01, 4)]:
        q = stats.t_quantile(df)
        noise = se * (tdist.rvs(df, size=200_000, random_state=rng) if math.isfinite(df) else rng.normal(size=200_000))
        if rule == "equivalent":
            observed = np.mean(np.abs(noise) + q * se < margin)
        elif rule == "at_least":
            observed = np.mean(noise - q * se > -margin)
        else:
            observed = np.mean(margin + noise - q * se > 0)
        assert V.power(rule, se, margin, df) == pytest.approx(observed, abs=0.005)
        half = 1.3 * q * se  # the floored interval: the same estimates, a wider interval
        if rule == "equivalent":
            observed = np.mean(np.abs(noise) + half < margin)
        elif rule == "at_least":
            observed = np.mean(noise - half > -margin)
        else:
            observed = np.mean(margin + noise - half > 0)
        assert V.power(rule, se, margin, df, half=half) == pytest.approx(observed, abs=0.005)
    assert V.power("equivalent", 0.01, 0.01, 2) == 0.0  # the interval alone is wider than the margin


def test_rules_on_t_intervals():
    rng = np.random.default_rng(4)
    judge = lambda rule, d, margin: V.judge(rule, V.Interval(float(np.mean(d)), *stats.parts(d).bounds()), margin)
    assert judge("equivalent", rng.normal(0, 0.003, 5), 0.02) == V.HOLDS
    assert judge("equivalent", rng.normal(0.05, 0.003, 5), 0.02) == V.FAILS
    assert judge("equivalent", [-0.2, 0.0, 0.2], 0.02) == V.UNSURE  # wide: never "equal"
    assert judge("at_least", rng.normal(-0.01, 0.002, 5), 0.02) == V.HOLDS
    assert judge("better", rng.normal(0.05, 0.005, 5), 0.02) == V.HOLDS
    assert judge("better", rng.normal(0.0, 0.002, 5), 0.02) == V.FAILS


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
    from qkvtune.data import main_metric, metrics

    constant_score = lambda task, labels, choices=None: metrics.constant_score(main_metric(task), labels, choices)
    labels = [1] * 68 + [0] * 32  # MRPC-like: always answering "paraphrase"
    assert constant_score("glue/sst2", labels) == pytest.approx(0.68)
    assert constant_score("glue/mrpc", labels) == pytest.approx(2 * 0.68 / 1.68)  # F1 of all-positive
    assert constant_score("glue/cola", labels) == 0.0 and constant_score("glue/stsb", [0.1, 2.0]) == 0.0
    assert constant_score("commonsense/arc", ["A", "B", "B"], ["A", "B", "C", "D"]) == pytest.approx(2 / 3)
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
