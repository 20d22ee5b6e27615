"""The claims suite: verdict rules against closed forms, suite validation, task discovery in any data folder,
and one end-to-end suite on a tiny model and real data (report, plots, reuse of finished runs)."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import data_dir, run_cli
from qkvtune.bench import verdicts as V
from qkvtune.bench.suite import discover_tasks, load_suite, parse_tasks, slot_task
from qkvtune.config import ConfigError

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def test_t_interval_is_the_student_t_interval():
    ci = V.t_interval([1.0, 2.0, 3.0])
    half = 2.919985580355516 * 1.0 / math.sqrt(3)  # t_{0.95}(2) · sd / √n, sd = 1
    assert ci.mean == 2.0 and ci.se == pytest.approx(1 / math.sqrt(3))
    assert (ci.low, ci.high) == pytest.approx((2.0 - half, 2.0 + half))
    one = V.t_interval([0.7])
    assert one.low == -math.inf and one.high == math.inf  # one seed says nothing
    assert V.t_interval([1.0, math.nan, 3.0]).n == 2


def test_rules_on_intervals():
    ci = lambda lo, hi: V.Interval((lo + hi) / 2, lo, hi)
    assert V.judge("at_least", ci(-0.01, 0.03), 0.02) == V.HOLDS
    assert V.judge("at_least", ci(-0.08, -0.03), 0.02) == V.FAILS  # worse by more than the margin for sure
    assert V.judge("at_least", ci(-0.05, 0.01), 0.02) == V.UNSURE
    assert V.judge("better", ci(0.001, 0.03), 0.01) == V.HOLDS
    assert V.judge("better", ci(-0.02, 0.005), 0.01) == V.FAILS  # cannot be better by the margin
    assert V.judge("equivalent", ci(-0.01, 0.01), 0.02) == V.HOLDS
    assert V.judge("equivalent", ci(-0.5, 0.5), 0.02) == V.UNSURE  # a wide interval never passes
    assert V.judge("equivalent", ci(0.03, 0.05), 0.02) == V.FAILS
    assert V.judge("above", ci(0.6, 0.7), threshold=0.5) == V.HOLDS
    assert V.judge("below", ci(0.4, 0.6), threshold=0.5) == V.UNSURE
    assert V.combine([V.HOLDS, V.HOLDS]) == V.HOLDS and V.combine([V.FAILS, V.FAILS]) == V.FAILS
    assert V.combine([V.HOLDS, V.FAILS]) == V.MIXED and V.combine([V.UNSURE, V.HOLDS]) == V.MIXED
    assert V.combine([V.UNTESTABLE]) == V.UNTESTABLE and V.combine([V.UNTESTABLE, V.HOLDS]) == V.HOLDS


def test_power_closed_forms():
    from scipy.stats import norm

    # at_least: P(d̂ − 1.645·se > −m) for d = 0 is Φ(m/se − 1.645); equivalent: 2Φ(m/se − 1.645) − 1
    assert V.power("at_least", 0.01, 0.02) == pytest.approx(norm.cdf(2 - norm.ppf(0.95)))
    assert V.power("equivalent", 0.01, 0.02) == pytest.approx(2 * norm.cdf(2 - norm.ppf(0.95)) - 1)
    assert math.isnan(V.power("above", 0.01, 0.02))
    # more seeds shrink only the seed part of the error: with no test-set noise 4× the seeds halve se
    n = V.seeds_needed("at_least", se=0.02, se_examples=0.0, n_seeds=3, margin=0.02)
    assert V.power("at_least", 0.02 * math.sqrt(3 / n), 0.02) >= 0.8 > V.power("at_least", 0.02 * math.sqrt(3 / (n - 1)), 0.02)
    assert V.seeds_needed("equivalent", se=0.03, se_examples=0.03, n_seeds=3, margin=0.02) is None  # test set too small


def _write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        yaml.safe_dump(data, f)


CLAIM = {"id": "C1", "title": "qv vs qkv", "tasks": ["glue.0"], "arms": {"qv": {"targets": ["q", "v"]}},
         "checks": [{"rule": "at_least", "a": "score:qv", "b": "score:qv", "margin": 0.01}]}


@pytest.mark.parametrize("bad, message", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"tasks": ["superglue.0"]}, "'superglue.0' is not a slot"),
    ({"checks": [{"rule": "bigger"}]}, "rule 'bigger'"),
    ({"reference": "qkv"}, "reference: 'qkv' names no arm"),
    ({"arms": {"qv": {"lr_from": "k"}}}, "lr_from 'k' names no arm"),
    ({"checks": [{"rule": "above", "a": "x"}]}, "needs a numeric threshold"),
])
def test_bad_claim_files_name_file_and_key(tmp_path, bad, message):
    _write(tmp_path, "suite.yaml", {"seeds": [0]})
    _write(tmp_path, "c1.yaml", {**CLAIM, **bad})
    with pytest.raises(ConfigError, match=message) as e:
        load_suite(str(tmp_path))
    assert "c1.yaml" in str(e.value)


def test_missing_suite_and_unknown_suite_key(tmp_path):
    with pytest.raises(ConfigError, match="suite.yaml not found"):
        load_suite(str(tmp_path))
    _write(tmp_path, "suite.yaml", {"seedz": [0]})
    with pytest.raises(ConfigError, match="unknown key 'seedz'"):
        load_suite(str(tmp_path))


def test_tasks_are_found_in_any_data_folder(tmp_path):
    for task in ("RTE", "SST-2", "not-a-task"):
        (tmp_path / "glue" / task).mkdir(parents=True)
        (tmp_path / "glue" / task / "train.tsv").write_text("x\n")
    for name in ("piqa", "half"):
        (tmp_path / "commonsense" / name).mkdir(parents=True)
        (tmp_path / "commonsense" / name / "train.json").write_text("[]")
    (tmp_path / "commonsense" / "piqa" / "test.json").write_text("[]")
    found = discover_tasks(str(tmp_path), {"glue": ["sst2", "mrpc"]})
    assert found == {"glue": ["glue/sst2", "glue/rte"], "commonsense": ["commonsense/piqa"]}
    assert slot_task(found, "glue.0") == "glue/sst2" and slot_task(found, "glue.3") == "glue/rte"  # wraps around
    assert slot_task(found, "commonsense.1") == "commonsense/piqa"
    assert parse_tasks("glue/qnli, commonsense/siqa") == {"glue": ["glue/qnli"], "commonsense": ["commonsense/siqa"]}
    with pytest.raises(ConfigError, match="--tasks"):
        parse_tasks("superglue/boolq")


@needs_data
def test_suite_end_to_end_on_a_tiny_model(tmp_path, tiny_bert_dir):
    suite = tmp_path / "suite"
    _write(suite, "suite.yaml", {
        "seeds": [0, 1], "prefer": {"glue": ["sst2", "cola"]},
        "families": {"glue": {"model": str(tiny_bert_dir), "max_train_samples": 48, "val_size": 16,
                              "max_eval_samples": 40, "max_steps": 6, "batch_size": 8, "eval_strategy": "steps",
                              "eval_steps": 2, "logging_steps": 2}},
        "lr_grid": {"lora": [1e-3, 1e-2]},
        "gate": {"over_constant": -1.0, "matthews_correlation": -1.0}, "not_learned": -1.0,
        "profiles": {"strict": {"claims": ["C1"], "gate": {"over_constant": 2.0}, "budgets": [1, 2]}}})
    _write(suite, "c1.yaml", {
        "id": "C1", "title": "qv vs qkv", "source": "test", "paper": "85.06 vs 83.25", "tasks": ["glue.0"],
        "base": {"method": "lora", "rank": 2, "alpha": 4}, "reference": "qv",
        "arms": {"qv": {"targets": ["q", "v"]}, "qkv": {"targets": ["q", "k", "v"]},
                 "qv4": {"targets": ["q", "v"], "rank": 4, "alpha": 8},
                 "qv_shuffled": {"targets": ["q", "v"], "shuffle_labels": True, "lr_from": "qv"}},
        "measures": [{"name": "steps_to_target", "arms": ["qv", "qkv"], "reference": "qv"},
                     {"name": "subspace", "a": "qv", "b": "qv4"}, {"name": "amplification", "arms": ["qv"]}],
        "derived": [{"name": "d", "of": ["score:qv", "score:qkv"]}],
        "checks": [{"part": "qv at least qkv", "rule": "at_least", "a": "score:qv", "b": "score:qkv", "margin": 0.05},
                   {"rule": "above", "a": "phi_top1:q", "threshold": -1.0}]})
    _write(suite, "c8.yaml", {
        "id": "C8", "title": "task vectors", "tasks": ["glue.0", "glue.1"],
        "base": {"method": "lora", "rank": 2, "alpha": 4, "targets": ["q", "v"]}, "arms": {"lora": {}},
        "measures": [{"name": "task_vectors", "arm": "lora"}],
        "checks": [{"rule": "above", "a": "add_retained", "threshold": 0.5}]})
    out = tmp_path / "out"
    cmd = ["bench", "claims", "--suite", str(suite), "--data-dir", data_dir(),
           "--out", str(out)]
    r = run_cli(*cmd)  # in process (the one-line error test below runs the real entry point)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "REPORT.md").read_text()
    assert "## C1: qv vs qkv" in report and "85.06 vs 83.25" in report and "| qv | glue/sst2 |" in report
    record = {c["id"]: c for c in json.load(open(out / "claims.json"))["claims"]}
    c1 = record["C1"]
    assert c1["tasks"] == c1["testable"] == ["glue/sst2"]
    runs = [{**json.load(open(p)), "dir": p.parent} for p in out.glob("runs/*/claims_run.json")]
    # each arm's rate is the grid value with the best validation score on the first seed, and every seed runs at it
    lrs = c1["learning_rates"]["glue/sst2"]
    for arm in ("qv", "qkv", "qv4"):
        grid = lrs[arm]["grid"]
        assert [g[0] for g in grid] == [1e-3, 1e-2] and lrs[arm]["lr"] == max(grid, key=lambda g: g[1])[0]
        for lr, val in grid:
            (rec,) = [x for x in runs if x["arm"] == arm and x["seed"] == 0 and x["settings"]["lr"] == lr
                      and x["settings"]["task"] == "glue/sst2"]
            assert rec["val_score"] == val == rec["metrics"]["eval_accuracy"]  # selection read validation only
    assert lrs["qv_shuffled"]["lr"] == lrs["qv"]["lr"] and lrs["qv_shuffled"]["grid"] == []
    # the reported score is the test split's: the whole dev file, predictions written per example
    q = c1["quantities"]
    accs = {}
    for seed in (0, 1):
        for arm in ("qv", "qkv"):
            (rec,) = [x for x in runs if x["arm"] == arm and x["seed"] == seed and x["settings"]["lr"] == lrs[arm]["lr"]
                      and x["settings"]["task"] == "glue/sst2"]
            pred = json.load(open(rec["dir"] / "test_predictions.json"))["dev"]
            assert len(pred["labels"]) == 40
            accs[seed, arm] = sum(p == y for p, y in zip(pred["predictions"], pred["labels"])) / 40
            assert accs[seed, arm] == pytest.approx(rec["score"]) == pytest.approx(rec["metrics"]["test_accuracy"])
    assert q["score:qv"] == pytest.approx([accs[0, "qv"], accs[1, "qv"]])
    assert q["d"] == pytest.approx([a - b for a, b in zip(q["score:qv"], q["score:qkv"])])
    check = c1["checks"][0]
    assert check["interval"]["how"] == "bootstrap" and check["part"] == "qv at least qkv"
    assert check["interval"]["mean"] == pytest.approx(sum(q["d"]) / 2)
    assert check["interval"]["low"] <= check["interval"]["high"]
    ci = V.Interval(**check["interval"])
    assert check["verdict"] == V.judge("at_least", ci, 0.05)  # the verdict follows from the interval by the rule
    assert 0 <= check["power"] <= 1
    assert all(0 <= p <= 1 for p in q["phi_top1:q"]) and all(f > 0 for f in q["factor:qv:q"])
    assert all(s in (2, 4, 6, 8) for s in q["steps:qv"])  # evaluations at 2, 4, 6 (8 = never reached)
    c8 = record["C8"]
    assert c8["tasks"] == ["glue/sst2", "glue/cola"] and len(c8["quantities"]["add_retained"]) == 2
    assert os.path.exists(out / "claims_plots" / "C1_scores.png") and os.path.exists(out / "claims_plots" / "C1_grid.png")
    # a second invocation reads every finished run; a gate the reference arm misses at budget ×1 raises the budget
    # (examples, steps, evaluation interval ×2) and probes it at the chosen rate; missed there, the largest
    # budget, the rest of the grid is tried too (two new runs in all); missed by every rate, the task is not
    # testable, and no other arm trains for it
    before = (out / "claims.log").read_text().count(" train ")
    r = run_cli(*cmd, "--profile", "strict")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "claims.log").read_text()
    assert log.count(" train ") == before + 2
    assert log.index(f"probe at lr={lrs['qv']['lr']:g}") < log.rindex(" train ")  # the probe first, then the grid
    grown = [json.load(open(p))["settings"] for p in out.glob("runs/*/claims_run.json")
             if json.load(open(p))["settings"]["max_steps"] != 6]
    assert sorted(g["lr"] for g in grown) == [1e-3, 1e-2] and all(g["targets"] == ["q", "v"] for g in grown)
    assert all((g["max_steps"], g["max_train_samples"], g["eval_steps"]) == (12, 96, 4) for g in grown)
    c1 = json.load(open(out / "claims.json"))["claims"][0]
    assert c1["verdict"] == V.UNTESTABLE and c1["testable"] == [] and list(c1["learning_rates"]["glue/sst2"]) == ["qv"]
    assert c1["budgets"]["glue/sst2"] == {"factor": 2, "max_train_samples": 96, "max_steps": 12, "eval_steps": 4}


def test_unknown_claim_is_one_line_error(tmp_path):
    _write(tmp_path, "suite.yaml", {"seeds": [0]})
    _write(tmp_path, "c1.yaml", CLAIM)
    r = subprocess.run([sys.executable, "-m", "qkvtune", "bench", "claims", "--suite", str(tmp_path), "--claims", "C9",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "C9" in r.stderr


def test_overrides_reach_every_run_or_one_family():
    from qkvtune.bench.runner import run_settings
    from qkvtune.bench.suite import Claim
    from qkvtune.bench.scores import score_of

    claim = Claim(id="C", title="t", tasks=["glue.0", "commonsense.0"], base={"rank": 8},
                  arms={"a": {"rank": 4, "only_tasks": ["glue.0"]}})
    suite = {"base": {"lr": 1.0}, "families": {"glue": {"model": "minilm", "lr": 2.0}, "commonsense": {"model": "llm"}},
             "overrides": {"glue.model": "roberta-base", "batch_size": 4}}
    glue = run_settings(suite, claim, "glue/sst2", "a", 1, None)
    assert glue == {"lr": 2.0, "model": "roberta-base", "rank": 4, "batch_size": 4, "task": "glue/sst2", "seed": 1}
    cs = run_settings(suite, claim, "commonsense/piqa", "a", 0, None)
    assert cs["model"] == "llm" and cs["batch_size"] == 4 and cs["lr"] == 1.0
    # MNLI-style records name the dev set: eval_matched_accuracy
    assert score_of({"eval_matched_accuracy": 0.8, "eval_mismatched_accuracy": 0.7}, "glue/mnli") == 0.8
    assert score_of({"eval_matthews_correlation": 0.3}, "glue/cola") == 0.3 and score_of({}, "glue/cola") is None
    assert score_of({"test_f1": 0.7, "eval_f1": 0.6}, "glue/mrpc", "test") == 0.7
