"""``qkvtune bench lr``: regret and noise by their definitions, the range test's pick read back from its own curve,
bad input in one line."""

import math
import statistics

import pytest

from conftest import data_dir, run_cli
from qkvtune.bench import lr as bench_lr

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def _point(lr, scores, collapsed=(False, False)):
    return {"lr": lr, "scores": list(scores), "mean": statistics.fmean(scores), "collapsed": list(collapsed),
            "seconds": [1.0, 1.0]}


def test_regret_is_against_the_grids_best_mean_beyond_its_two_seed_noise():
    record = {"higher_better": True,
              "grid": {"0.001": _point(1e-3, [0.80, 0.84]), "0.003": _point(3e-3, [0.85, 0.83])},
              "rules": {"auto": {**_point(None, [0.83, 0.84]), "rates": [2e-3, 4.5e-3]},
                        "fixed 0.0001": _point(1e-4, [0.79, 0.81])}}
    bench_lr.judge(record)
    assert record["best_rate"] == 3e-3 and record["best"] == pytest.approx(0.84)
    noise = statistics.stdev([0.85, 0.83]) / math.sqrt(2)
    assert record["noise"] == pytest.approx(noise)
    auto, fixed = record["rules"]["auto"], record["rules"]["fixed 0.0001"]
    assert auto["regret"] == pytest.approx(0.005) and auto["regret_beyond_noise"] == 0.0
    assert fixed["regret"] == pytest.approx(0.04) and fixed["regret_beyond_noise"] == pytest.approx(0.04 - noise)
    assert auto["log10_over_best"] == pytest.approx(math.log10(3e-3 / 3e-3))  # geometric mean of 2e-3 and 4.5e-3
    assert fixed["log10_over_best"] == pytest.approx(math.log10(1e-4 / 3e-3))
    # a loss: lower is better, regret as a fraction of the best
    loss = {"higher_better": False, "grid": {"0.001": _point(1e-3, [2.0, 2.2]), "0.01": _point(1e-2, [2.5, 2.5])},
            "rules": {"auto": {**_point(None, [2.2, 2.4]), "rates": [1e-3, 1e-3]}}}
    bench_lr.judge(loss)
    assert loss["best"] == pytest.approx(2.1)
    assert loss["rules"]["auto"]["regret"] == pytest.approx(0.2 / 2.1)
    noise = statistics.stdev([2.0, 2.2]) / math.sqrt(2)
    assert loss["rules"]["auto"]["regret_beyond_noise"] == pytest.approx(0.2 / 2.1 - noise / 2.1)


def test_per_seed_compares_autos_rate_with_that_seeds_own_best():
    record = {"higher_better": True, "seeds": [0, 1],
              "grid": {"0.0003": _point(3e-4, [0.79, 0.60]), "0.001": _point(1e-3, [0.80, 0.79]),
                       "0.003": _point(3e-3, [0.78, 0.80])},
              "rules": {"auto": {**_point(None, [0.80, 0.61]), "rates": [1e-3, 3.2e-4]}}}
    got = bench_lr.per_seed(record)
    assert [(p["seed"], p["best_rate"]) for p in got] == [(0, 1e-3), (1, 3e-3)]
    assert got[0]["log10_gap"] == pytest.approx(0.0)
    assert got[1]["log10_gap"] == pytest.approx(math.log10(3.2e-4 / 3e-3))  # a decade under what seed 1 needed
    loss = {"higher_better": False, "seeds": [0], "grid": {"0.001": _point(1e-3, [2.0]), "0.01": _point(1e-2, [1.9])},
            "rules": {"auto": {**_point(None, [2.0]), "rates": [1e-3]}}}
    assert bench_lr.per_seed(loss)[0]["best_rate"] == 1e-2  # a loss: the lowest


@needs_data
def test_range_test_picks_the_steepest_fall_of_its_own_smoothed_curve(tmp_path, tiny_bert_dir):
    settings = dict(model=tiny_bert_dir, task="glue/sst2", data_dir=data_dir(), max_train_samples=64,
                    max_eval_samples=16, batch_size=8, method="lora", rank=4, alpha=8, targets=["q", "v"], seed=0)
    found = bench_lr.range_test(settings, log=lambda m: None, out_dir=str(tmp_path / "range"))
    rates, smooth = zip(*found["curve"])
    assert 0 < len(rates) <= bench_lr.RANGE_STEPS and rates[0] == pytest.approx(bench_lr.RANGE[0])
    assert all(b > a for a, b in zip(rates, rates[1:]))  # exponentially rising
    end = smooth.index(min(smooth)) + 1
    slopes = [(smooth[i + 1] - smooth[i - 1]) / math.log(rates[i + 1] / rates[i - 1]) for i in range(1, end - 1)]
    want = rates[1 + slopes.index(min(slopes))] if slopes else rates[end - 1]
    assert found["lr"] == pytest.approx(want, rel=5e-3)  # (the rate kept to 3 figures, the curve to 4)


def test_bad_settings_is_one_line_and_exit_2(tmp_path):
    r = run_cli("bench", "lr", "--settings", "sst2 LoRA r9", "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and "--settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_grid_extends_a_half_decade_past_the_edge_its_best_sits_at():
    grid = {"1e-05": {"mean": 0.50}, "0.0001": {"mean": 0.55}, "0.001": {"mean": 0.74}}
    assert bench_lr.beyond_edge(grid, higher=True) == [0.003]
    grid["0.003"] = {"mean": 0.78}
    assert bench_lr.beyond_edge(grid, higher=True) == [0.01]
    grid["0.01"] = {"mean": 0.70}
    assert bench_lr.beyond_edge(grid, higher=True) == []  # interior
    assert bench_lr.beyond_edge({"3e-05": {"mean": 2.0}, "0.001": {"mean": 2.2}}, higher=False) == [1e-05]  # a loss
    assert bench_lr.beyond_edge({"0.03": {"mean": 0.9}, "0.01": {"mean": 0.8}}, higher=True) == []  # the bound
