"""The claims suite: verdict rules against closed forms, suite validation, task discovery in any data folder,
and one end-to-end suite on a tiny model and real data (report, plots, reuse of finished runs)."""

import json
import math
import os
import subprocess
import sys

import pytest
import yaml

from conftest import data_dir
from qkvtune.bench import verdicts as V
from qkvtune.bench.claims import discover_tasks, load_suite, parse_tasks, slot_task
from qkvtune.config import ConfigError

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def test_interval_is_the_student_t_interval():
    ci = V.interval([1.0, 2.0, 3.0])
    half = 2.919985580355516 * 1.0 / math.sqrt(3)  # t_{0.95}(2) · sd / √n, sd = 1
    assert ci.mean == 2.0 and ci.sd == pytest.approx(1.0)
    assert (ci.low, ci.high) == pytest.approx((2.0 - half, 2.0 + half))
    one = V.interval([0.7])
    assert one.low == -math.inf and one.high == math.inf  # one seed says nothing
    assert V.interval([1.0, math.nan, 3.0]).n == 2


def test_rules():
    a, b = [0.80, 0.82, 0.81], [0.79, 0.80, 0.80]
    assert V.non_inferior(a, b, 0.01)[0] == V.HOLDS
    assert V.superior(a, b, 0.01)[0] == V.HOLDS  # differences 0.01, 0.02, 0.01: all above 0
    assert V.non_inferior(b, [x + 0.05 for x in b], 0.01)[0] == V.FAILS  # 0.05 worse in every seed
    assert V.superior(b, b, 0.01)[0] == V.FAILS  # identical: cannot be better by the margin
    assert V.non_inferior([0.8, 0.7, 0.9], [0.8, 0.8, 0.8], 0.01)[0] == V.UNSURE  # noise wider than the margin
    assert V.above([0.6, 0.7, 0.65], 0.5)[0] == V.HOLDS and V.above([0.1, 0.2, 0.15], 0.5)[0] == V.FAILS
    assert V.below([0.1, 0.2, 0.15], 0.5)[0] == V.HOLDS and V.below([0.4, 0.6, 0.5], 0.5)[0] == V.UNSURE
    assert V.contains([-0.5, -0.4, -0.45], -0.45)[0] == V.HOLDS
    assert V.contains([-0.5, -0.4, -0.45], -0.9)[0] == V.FAILS
    assert V.contains([-3.0, 2.0, 0.5], 0.1)[0] == V.UNSURE  # contains it, but the interval is far too wide
    assert V.combine([V.HOLDS, V.HOLDS]) == V.HOLDS
    assert V.combine([V.HOLDS, V.UNSURE]) == V.UNSURE
    assert V.combine([V.UNSURE, V.FAILS]) == V.FAILS


def _write(folder, name, data):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        yaml.safe_dump(data, f)


CLAIM = {"id": "C1", "title": "qv vs qkv", "tasks": ["glue.0"], "arms": {"qv": {"targets": ["q", "v"]}},
         "checks": [{"rule": "non_inferior", "a": "score:qv", "b": "score:qv", "margin": 0.01}]}


@pytest.mark.parametrize("bad, message", [
    ({"colour": 1}, "unknown key 'colour'"),
    ({"tasks": ["superglue.0"]}, "'superglue.0' is not a slot"),
    ({"checks": [{"rule": "bigger"}]}, "rule 'bigger'"),
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
        "profiles": {"glue": {"model": str(tiny_bert_dir), "max_train_samples": 48, "max_eval_samples": 24,
                              "max_steps": 6, "batch_size": 8, "lr": 5e-3, "eval_strategy": "steps",
                              "eval_steps": 2, "logging_steps": 2}}})
    _write(suite, "c1.yaml", {
        "id": "C1", "title": "qv vs qkv", "source": "test", "paper": "85.06 vs 83.25", "tasks": ["glue.0"],
        "base": {"method": "lora", "rank": 2, "alpha": 4},
        "arms": {"qv": {"targets": ["q", "v"]}, "qkv": {"targets": ["q", "k", "v"]}, "qv4": {"targets": ["q", "v"],
                                                                                           "rank": 4}},
        "measures": [{"name": "steps_to_target", "arms": ["qv", "qkv"], "reference": "qv"},
                     {"name": "subspace", "a": "qv", "b": "qv4"}, {"name": "amplification", "arms": ["qv"]}],
        "derived": [{"name": "d", "of": ["score:qv", "score:qkv"]}],
        "checks": [{"rule": "non_inferior", "a": "score:qv", "b": "score:qkv", "margin": 0.01},
                   {"rule": "above", "a": "phi_top1", "threshold": -1.0}]})
    _write(suite, "c8.yaml", {
        "id": "C8", "title": "task vectors", "tasks": ["glue.0", "glue.1"],
        "base": {"method": "lora", "rank": 2, "alpha": 4, "targets": ["q", "v"]}, "arms": {"lora": {}},
        "measures": [{"name": "task_vectors", "arm": "lora"}],
        "checks": [{"rule": "above", "a": "add_retained", "threshold": 0.5}]})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qkvtune", "bench", "claims", "--suite", str(suite), "--data-dir", data_dir(),
           "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "REPORT.md").read_text()
    assert "## C1: qv vs qkv" in report and "85.06 vs 83.25" in report and "| qv |" in report
    record = {c["id"]: c for c in json.load(open(out / "claims.json"))["claims"]}
    c1 = record["C1"]
    assert c1["verdict"] in (V.HOLDS, V.FAILS, V.UNSURE) and c1["tasks"] == ["glue/sst2"]
    q = c1["quantities"]
    assert len(q["score:qv"]) == 2 and all(0 <= s <= 1 for s in q["score:qv"] + q["score:qkv"])
    assert q["d"] == pytest.approx([a - b for a, b in zip(q["score:qv"], q["score:qkv"])])
    assert all(0 <= p <= 1 for p in q["phi_top1"]) and all(f > 0 for f in q["factor:qv"])
    assert all(s in (2, 4, 6, 8) for s in q["steps:qv"])  # evaluations at 2, 4, 6 (8 = never reached)
    # the rule applied to the recorded quantities gives the recorded verdict
    assert c1["checks"][0]["verdict"] == V.non_inferior(q["score:qv"], q["score:qkv"], 0.01)[0]
    c8 = record["C8"]
    assert c8["tasks"] == ["glue/sst2", "glue/cola"] and len(c8["quantities"]["add_retained"]) == 2
    assert os.path.exists(out / "claims_plots" / "C1_scores.png") and os.path.exists(out / "claims_plots" / "C1_curves.png")
    # a second invocation reads every finished run instead of training it again
    before = (out / "claims.log").read_text().count(" train ")
    r = subprocess.run(cmd + ["--claims", "C1"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "claims.log").read_text().count(" train ") == before
    assert json.load(open(out / "claims.json"))["claims"][0]["quantities"]["score:qv"] == q["score:qv"]


def test_unknown_claim_is_one_line_error(tmp_path):
    _write(tmp_path, "suite.yaml", {"seeds": [0]})
    _write(tmp_path, "c1.yaml", CLAIM)
    r = subprocess.run([sys.executable, "-m", "qkvtune", "bench", "claims", "--suite", str(tmp_path), "--claims", "C9",
                        "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "C9" in r.stderr


def test_overrides_reach_every_run_or_one_family():
    from qkvtune.bench.claims import Claim, run_settings, score_of

    claim = Claim(id="C", title="t", tasks=["glue.0", "commonsense.0"], base={"rank": 8},
                  arms={"a": {"rank": 4, "only_tasks": ["glue.0"]}})
    suite = {"base": {"lr": 1.0}, "profiles": {"glue": {"model": "minilm", "lr": 2.0}, "commonsense": {"model": "llm"}},
             "overrides": {"glue.model": "roberta-base", "batch_size": 4}}
    glue = run_settings(suite, claim, "glue/sst2", "a", 1, None)
    assert glue == {"lr": 2.0, "model": "roberta-base", "rank": 4, "batch_size": 4, "task": "glue/sst2", "seed": 1}
    cs = run_settings(suite, claim, "commonsense/piqa", "a", 0, None)
    assert cs["model"] == "llm" and cs["batch_size"] == 4 and cs["lr"] == 1.0
    # MNLI-style records name the dev set: eval_matched_accuracy
    assert score_of({"eval_matched_accuracy": 0.8, "eval_mismatched_accuracy": 0.7}, "glue/mnli") == 0.8
    assert score_of({"eval_matthews_correlation": 0.3}, "glue/cola") == 0.3 and score_of({}, "glue/cola") is None
