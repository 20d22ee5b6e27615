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
    assert V.combine([V.NOT_RUN, V.FAILS]) == V.FAILS and V.combine([V.NOT_RUN]) == V.NOT_RUN
    assert V.combine([V.NOT_RUN, V.UNTESTABLE]) == V.UNTESTABLE


def test_power_closed_forms():
    from scipy.stats import norm, t

    # at_least: P(d̂ − q·se > −m) for d = 0 with d̂ ~ se·T_df is 1 − F(q − m/se); equivalent: 2F(m/se − q) − 1
    q2 = t.ppf(0.95, 2)
    assert V.power("at_least", 0.01, 0.02, 2) == pytest.approx(1 - t.cdf(q2 - 2, 2))
    assert V.power("equivalent", 0.005, 0.02, 2) == pytest.approx(2 * t.cdf(4 - q2, 2) - 1)
    assert V.power("at_least", 0.01, 0.02) == pytest.approx(norm.cdf(2 - norm.ppf(0.95)))  # infinite df: normal
    assert math.isnan(V.power("above", 0.01, 0.02))
    # more seeds shrink only the seed part of the error, and the degrees of freedom grow with them
    n = V.seeds_needed("at_least", var_seeds=0.02 ** 2, var_examples=0.0, n_seeds=3, margin=0.02)
    se = lambda k: 0.02 * math.sqrt(3 / k)
    assert V.power("at_least", se(n), 0.02, n - 1) >= 0.8 > V.power("at_least", se(n - 1), 0.02, n - 2)
    assert V.seeds_needed("equivalent", var_seeds=1e-4, var_examples=0.03 ** 2, n_seeds=3, margin=0.02) is None


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
    assert found == {"glue": ["glue/sst2", "glue/rte"], "commonsense": ["commonsense/piqa"], "sft": []}
    assert slot_task(found, "glue.0") == "glue/sst2" and slot_task(found, "glue.3") == "glue/rte"  # wraps around
    assert slot_task(found, "commonsense.1") == "commonsense/piqa"
    assert parse_tasks("glue/qnli, commonsense/siqa") == {"glue": ["glue/qnli"], "commonsense": ["commonsense/siqa"],
                                                          "sft": []}
    # kind slots look among every task found: the first GLUE regression task, whatever a profile kept
    (tmp_path / "glue" / "STS-B").mkdir()
    (tmp_path / "glue" / "STS-B" / "train.tsv").write_text("x\n")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "chats.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "text" / "book.txt").write_text("plain text")
    found = discover_tasks(str(tmp_path), {"glue": ["sst2", "mrpc"]})
    assert found["sft"] == ["sft/chats.jsonl"]
    kept = {"glue": found["glue"][:1], "commonsense": [], "sft": []}
    assert slot_task(kept, "glue.regression.0", found) == "glue/stsb" and slot_task(kept, "glue.regression.1", found) is None
    assert slot_task(kept, "glue.1") == "glue/sst2"
    with pytest.raises(ConfigError, match="--tasks"):
        parse_tasks("superglue/boolq")


TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@needs_data
def test_suite_end_to_end_on_a_tiny_model(tmp_path, tiny_bert_dir, tiny_llama_dir):
    suite = tmp_path / "suite"
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    ref = {"method": "lora", "rank": 2, "alpha": 4, "targets": ["q", "v"]}
    _write(suite, "suite.yaml", {
        "seeds": [0, 1], "prefer": {"glue": ["sst2", "cola"]},
        "families": {"glue": {"model": str(tiny_bert_dir), "max_train_samples": 48, "val_size": 16,
                              "max_eval_samples": 40, "max_steps": 6, "batch_size": 8, "eval_strategy": "steps",
                              "eval_steps": 2, "logging_steps": 2},
                     "sft": {"model": str(tiny_llama_dir), "chat_template": str(template), "as_chat": True,
                             "max_train_samples": 24, "val_size": 8, "max_eval_samples": 12, "max_length": 64,
                             "max_steps": 4, "batch_size": 4, "eval_batch_size": 4, "eval_strategy": "steps",
                             "eval_steps": 2, "logging_steps": 2}},
        "reference": {"glue": ref, "sft": ref},
        "lr_grid": {"lora": [1e-3, 1e-2]}, "lr_bounds": {"lora": [1e-3, 1e-2]},
        "gate": {"over_constant": -1.0, "matthews_correlation": -1.0, "loss": -1.0}, "not_learned": -1.0,
        "rising": 10.0,
        "profiles": {"strict": {"claims": ["C1"], "gate": {"over_constant": 2.0}, "budgets": [1, 2]},
                     "bounded": {"claims": ["C1"], "gate": {"over_constant": 2.0}, "budgets": [1, 2, 4],
                                 "max_minutes": 60}}})
    _write(suite, "c1.yaml", {
        "id": "C1", "title": "qv vs qkv", "source": "test", "paper": "85.06 vs 83.25", "tasks": ["glue.0"],
        "base": {"method": "lora", "rank": 2, "alpha": 4}, "reference": "qv",
        "arms": {"qv": {"targets": ["q", "v"]}, "qkv": {"targets": ["q", "k", "v"]},
                 "qv4": {"targets": ["q", "v"], "rank": 4, "alpha": 8},
                 "qv4_other": {"targets": ["q", "v"], "rank": 4, "alpha": 8, "lr_from": "qv"},
                 "qv_shuffled": {"targets": ["q", "v"], "shuffle_labels": True, "lr_from": "qv", "steps_from": "qv",
                                 "eval_strategy": "no"}},
        "measures": [{"name": "steps_to_target", "arms": ["qv", "qkv"], "reference": "qv"},
                     {"name": "subspace", "a": "qv", "b": "qv4", "side": "B", "control": ["qv_shuffled", "qv4"]},
                     {"name": "amplification", "arms": ["qv", "qv_shuffled"]}],
        "derived": [{"name": "d", "of": ["score:qv", "score:qkv"]}],
        "checks": [{"part": "qv at least qkv", "rule": "at_least", "a": "score:qv", "b": "score:qkv", "margin": 0.05},
                   {"rule": "above", "a": "phi_top1:q", "threshold": -1.0}]})
    _write(suite, "c8.yaml", {
        "id": "C8", "title": "task vectors", "tasks": ["glue.0", "glue.1"],
        "base": {"method": "lora", "rank": 2, "alpha": 4, "targets": ["q", "v"]}, "arms": {"lora": {}},
        "measures": [{"name": "task_vectors", "arm": "lora"}],
        "checks": [{"rule": "above", "a": "add_retained", "threshold": 0.5}]})
    _write(suite, "c10.yaml", {
        "id": "C10", "title": "attention vs MLP", "tasks": ["sft.0"], "base": {"method": "lora"},
        "paper": [{"text": "the MLP matters most", "source": "test"}], "reference": "qv",
        "arms": {"qv": {"targets": ["q", "v"], "rank": 2, "alpha": 4}, "mlp": {"targets": ["mlp"], "rank": 2, "alpha": 4},
                 "qv_eqp": {"targets": ["q", "v"], "params_from": "mlp"}},
        "checks": [{"part": "MLP beats attention at equal parameters", "task": "sft.0", "rule": "better",
                    "a": "score:mlp", "b": "score:qv_eqp", "margin": 0.01},
                   {"part": "on a task this run lacks", "task": "glue.regression.0", "rule": "better",
                    "a": "score:mlp", "b": "score:qv", "margin": 0.01}],
        "conclusion": {"above": "the MLP", "below": "attention"}})
    out = tmp_path / "out"
    cmd = ["bench", "claims", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(out), "--device", "cpu"]
    r = run_cli(*cmd)  # in process (the one-line error test below runs the real entry point)
    assert r.returncode == 0, r.stderr[-2000:]
    report = (out / "REPORT.md").read_text()
    assert "## C1: qv vs qkv" in report and "85.06 vs 83.25" in report and "| qv | glue/sst2 |" in report
    assert "### Testable here?" in report and "CPU time" in report
    assert "| C1 | qv at least qkv | " in report.split("### For a reviewer")[1]  # each part: could it fail, what resolves it
    record = {c["id"]: c for c in json.load(open(out / "claims.json"))["claims"]}
    c1 = record["C1"]
    assert c1["tasks"] == c1["testable"] == ["glue/sst2"]
    runs = [{**json.load(open(p)), "dir": p.parent} for p in out.glob("runs/*/claims_run.json")]
    # the task's reference arm searched its rate with the head at the same rate; that rate is then every run's
    # lr_head, so arms differ only in their ΔW
    head = c1["head_lr"]["glue/sst2"]
    assert head in (1e-3, 1e-2)
    sst2 = [x for x in runs if x["settings"]["task"] == "glue/sst2"]
    assert all(x["settings"]["lr_head"] == head for x in sst2 if x["arm"] != "reference")
    assert {x["settings"]["lr"] for x in sst2 if x["arm"] == "reference"} == {1e-3, 1e-2}
    assert all(x["settings"]["lr_head"] == x["settings"]["lr"] for x in sst2 if x["arm"] == "reference")
    # each arm's rate is the grid value with the best validation score on the first seed (a tie: the next seed
    # decides), at the grid's bound here (flagged), and every seed runs at it
    lrs = c1["learning_rates"]["glue/sst2"]
    label = {"qv": "reference", "qkv": "qkv", "qv4": "qv4"}  # a run trained first for the task's reference arm
    for arm in ("qv", "qkv", "qv4"):
        grid = lrs[arm]["grid"]
        best = max(v for _, v in grid)
        assert [g[0] for g in grid] == [1e-3, 1e-2] and lrs[arm]["lr"] in [g[0] for g in grid if g[1] == best]
        assert lrs[arm]["at_bound"] == ("lower" if lrs[arm]["lr"] == 1e-3 else "upper")
        if len([g for g in grid if g[1] == best]) > 1:
            assert lrs[arm]["ties"] and lrs[arm]["ties"][0]["decided_by"] in ("the next seed", "validation loss")
        for lr, val in grid:
            (rec,) = [x for x in sst2 if x["arm"] in (arm, label[arm]) and x["seed"] == 0 and x["settings"]["lr"] == lr
                      and x["settings"]["lr_head"] == head]
            assert rec["val_score"] == val == rec["metrics"]["eval_accuracy"]  # selection read validation only
    assert lrs["qv_shuffled"]["lr"] == lrs["qv"]["lr"] and lrs["qv_shuffled"]["grid"] == []
    # the shuffled control: patience off, the final adapter, exactly as many steps as its task arm in each seed
    for seed in (0, 1):
        (task_run,) = [x for x in sst2 if x["arm"] in ("qv", "reference") and x["seed"] == seed
                       and x["settings"]["lr"] == lrs["qv"]["lr"] and x["settings"]["lr_head"] == head]
        (control,) = [x for x in sst2 if x["arm"] == "qv_shuffled" and x["seed"] == seed]
        assert control["settings"]["max_steps"] == task_run["metrics"]["global_step"] == control["metrics"]["global_step"]
        assert control["settings"]["patience"] is None and control["settings"]["shuffle_labels"]
    # the reported score is the test split's: the whole dev file, predictions written per example
    q = c1["quantities"]
    accs = {}
    for seed in (0, 1):
        for arm in ("qv", "qkv"):
            (rec,) = [x for x in sst2 if x["arm"] in (arm, label[arm]) and x["seed"] == seed
                      and x["settings"]["lr"] == lrs[arm]["lr"] and x["settings"]["lr_head"] == head]
            pred = json.load(open(rec["dir"] / "test_predictions.json"))["dev"]
            assert len(pred["labels"]) == 40
            accs[seed, arm] = sum(p == y for p, y in zip(pred["predictions"], pred["labels"])) / 40
            assert accs[seed, arm] == pytest.approx(rec["score"]) == pytest.approx(rec["metrics"]["test_accuracy"])
            # every compared arm is also scored with ΔW removed: its head as trained, every delta off
            off = json.load(open(rec["dir"] / "without_delta.json"))
            assert len(off["predictions"]["labels"]) == 40 and 0 <= off["score"] <= 1
    assert q["score:qv"] == pytest.approx([accs[0, "qv"], accs[1, "qv"]])
    assert q["d"] == pytest.approx([a - b for a, b in zip(q["score:qv"], q["score:qkv"])])
    check = c1["checks"][0]
    assert check["part"] == "qv at least qkv"
    heads = c1["head_only"]["glue/sst2"]
    assert set(heads) == {"qv", "qkv"}  # the arms a check compares
    for arm in ("qv", "qkv"):  # the t interval of the per-seed validation gain over the same runs without ΔW:
        iv = heads[arm]["interval"]  # above 0 learned, at or below 0 not, across 0 unresolved
        assert heads[arm]["status"] == ("learned" if iv["low"] > 0 else "adapter not learned" if iv["high"] <= 0
                                        else "gain unresolved") and heads[arm]["learned"] == (iv["high"] > 0)
    if all(heads[a]["learned"] for a in ("qv", "qkv")):
        assert check["interval"]["how"].startswith("t, seeds + examples")
        assert check["interval"]["mean"] == pytest.approx(sum(q["d"]) / 2)
        assert check["interval"]["low"] <= check["interval"]["high"]
        assert check["verdict"] == V.judge("at_least", V.Interval(**check["interval"]), 0.05)
    else:  # the part is not testable: an adapter that does not beat its own head-only score says nothing
        assert check["verdict"] == V.UNTESTABLE and "adapter not learned" in check["note"]
    assert all(0 <= p <= 1 for p in q["phi_top1:q"]) and all(f > 0 for f in q["factor:qv:q"])
    assert "phi_top1_other_seed:q" in q and "psi_bottom_over_random_other_seed:q" in q and "factor_product:qv:q" in q
    assert q["log_factor_over_random:qv:q"] == pytest.approx([-math.log(x) for x in q["dirs_over_random:qv:q"]])
    assert not [k for k in q if k.startswith("dirs_over_random_other_seed")]  # v3's relabelled control is gone
    assert all(s in (2, 4, 6, 8) for s in q["steps:qv"])  # evaluations at 2, 4, 6 (8 = never reached)
    c8 = record["C8"]
    assert c8["tasks"] == ["glue/sst2", "glue/cola"] and len(c8["quantities"]["add_retained"]) == 2
    # an sft task judged by its test loss (lower is better): a params_from arm takes the rank with the MLP arm's
    # parameter count; the per-task check reads that task alone; a check on a task this run lacks is not testable
    c10 = record["C10"]
    assert c10["tasks"] == c10["testable"] == ["sft/alpaca_data_1k.json"]
    sft = [x for x in runs if x["settings"]["task"] == "sft"]
    assert all(x["settings"]["as_chat"] and x["settings"]["train_file"].endswith("text/alpaca_data_1k.json") for x in sft)
    assert all("lr_head" not in x["settings"] for x in sft)  # a causal LM has no new head
    eqp = {x["settings"]["rank"] for x in sft if x["arm"] == "qv_eqp"}
    assert len(eqp) == 1 and eqp.pop() > 2  # the MLP arm's weights take a higher q,v rank
    part, other = c10["checks"]
    assert part["interval"]["how"].startswith("t, seeds + examples") and math.isfinite(part["interval"]["mean"])
    chosen = c10["learning_rates"]["sft/alpaca_data_1k.json"]
    scored = {(x["arm"], x["seed"]): x["score"] for x in sft
              if x["arm"] in ("mlp", "qv_eqp") and x["settings"]["lr"] == chosen[x["arm"]]["lr"]}
    gain = sum(scored["qv_eqp", s] - scored["mlp", s] for s in (0, 1)) / 2  # a loss: b − a is a's gain
    assert part["interval"]["mean"] == pytest.approx(gain)
    assert other["verdict"] == V.UNTESTABLE and "glue/stsb not among this claim's tasks" in other["note"]
    assert "Which source the evidence supports" in report
    assert os.path.exists(out / "claims_plots" / "C1_scores.png") and os.path.exists(out / "claims_plots" / "C1_grid.png")
    # a second invocation reads every finished run; where the task's reference arm misses the gate at budget ×1
    # the budget grows (examples, steps and evaluation interval ×2) and the whole grid is searched again there (a
    # rate chosen where nothing learned is no choice): missed by every rate at the largest budget, the task is not
    # testable, and no other arm trains for it
    before = (out / "claims.log").read_text().count(" train ")
    r = run_cli(*cmd, "--profile", "strict")
    assert r.returncode == 0, r.stderr[-2000:]
    log = (out / "claims.log").read_text()
    assert log.count(" train ") == before + 2
    assert "budget ×2, rates 0.001: " in log
    grown = [json.load(open(p))["settings"] for p in out.glob("runs/*/claims_run.json")
             if json.load(open(p))["settings"]["max_steps"] == 12]
    assert sorted(g["lr"] for g in grown) == [1e-3, 1e-2] and all(g["targets"] == ["q", "v"] for g in grown)
    assert all((g["max_steps"], g["max_train_samples"], g["eval_steps"]) == (12, 96, 4) for g in grown)
    c1 = json.load(open(out / "claims.json"))["claims"][0]
    assert c1["verdict"] == V.UNTESTABLE and c1["testable"] == [] and list(c1["learning_rates"]["glue/sst2"]) == ["qv"]
    assert c1["budgets"]["glue/sst2"] == {"factor": 2, "max_train_samples": 96, "max_steps": 12, "eval_steps": 4}
    # a time bound (--max-minutes over the profile's max_minutes): finished runs are read, no run starts past it
    # (×4 would train here), and the report is written with every rate and budget tried
    os.remove(out / "REPORT.md")
    r = run_cli(*cmd, "--profile", "bounded", "--max-minutes", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "claims.log").read_text().count(" train ") == before + 2
    c1 = json.load(open(out / "claims.json"))["claims"][0]
    assert c1["verdict"] == "not testable within the bound" and "the bound of 0 min" in c1["skipped"]
    assert "glue/sst2 reference ×1: 0.001 (seed 0): " in c1["skipped"] and ", 0.01 (seed 0): " in c1["skipped"]
    assert "glue/sst2 reference ×2: 0.001 (seed 0): " in c1["skipped"]
    assert "not testable within the bound" in (out / "REPORT.md").read_text()


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


# --- the rate search and the budget ladder, on runs whose scores are set by hand ------------------------------

def _context(monkeypatch, score, suite=None, seeds=(0, 1, 2)):
    """A Runner whose runs are not trained: each run's validation score is ``score(settings)`` (a number, or
    (score, loss)); every run is recorded in ``trained``."""
    from qkvtune.bench import runner

    suite = suite or {"lr_grid": {"lora": [1e-3, 3e-3, 1e-2]}, "lr_bounds": {"lora": [1e-4, 1e-1]}}
    ctx = runner.Runner(suite, {"glue": ["glue/sst2"]}, list(seeds), None, "unused", lambda msg: None)
    trained = []

    def run(settings, task, arm):
        trained.append(settings)
        val = score(settings)
        val, loss = val if isinstance(val, tuple) else (val, 1.0)
        curve = [{"step": s, "eval_accuracy": val - 0.1 * (settings["max_steps"] - s) / settings["max_steps"]}
                 for s in range(10, settings["max_steps"] + 1, 10)]
        return runner.SuiteRun(task, arm, settings["seed"], "unused", {"eval_loss": loss, "global_step": settings["max_steps"]},
                          val, val, curve, 1.0, settings["max_steps"])

    monkeypatch.setattr(ctx, "run", run)
    return ctx, trained


def _claim(**arm):
    from qkvtune.bench.suite import Claim

    return Claim(id="C", title="t", tasks=["glue.0"], base={"method": "lora", "max_steps": 100}, arms={"a": arm})


def test_a_best_rate_at_an_edge_extends_the_grid_until_it_is_interior(monkeypatch):
    from qkvtune.bench.runner import next_rate

    peak = lambda p: (lambda s: -abs(math.log10(s["lr"]) - math.log10(p)))
    ctx, trained = _context(monkeypatch, peak(3e-2))
    res = ctx.arm(_claim(), "glue/sst2", "a", {}, [0])
    assert [g[0] for g in res.grid] == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1] and res.lr == 3e-2 and res.at_bound is None
    ctx, trained = _context(monkeypatch, peak(1e-4))  # below: 3e-4 … down to the lower bound
    res = ctx.arm(_claim(), "glue/sst2", "a", {}, [0])
    assert [g[0] for g in res.grid] == [1e-4, 3e-4, 1e-3, 3e-3, 1e-2] and res.lr == 1e-4
    assert res.at_bound == "lower"  # still best at the bound: flagged, not hidden
    assert next_rate(3e-3, 3.0) == 1e-2 and next_rate(3e-4, 1 / 3.33) == 1e-4 and next_rate(2e-3, 1.5) == 3e-3
    # the bound is the end of the search even when the grid's own step would pass it
    ctx, _ = _context(monkeypatch, peak(1.0), {"lr_grid": {"lora": [1e-3, 3e-3, 1e-2]}, "lr_bounds": {"lora": [1e-3, 2e-2]}})
    res = ctx.arm(_claim(), "glue/sst2", "a", {}, [0])
    assert [g[0] for g in res.grid] == [1e-3, 3e-3, 1e-2, 2e-2] and res.at_bound == "upper"


def test_ties_are_broken_by_a_further_evaluation_not_by_order(monkeypatch):
    # seed 0 ties 1e-3 and 3e-3 (the lower came first and v2 took it); seed 1 prefers 3e-3
    table = {(1e-3, 0): 0.835, (3e-3, 0): 0.835, (1e-2, 0): 0.80, (1e-3, 1): 0.82, (3e-3, 1): 0.85}
    ctx, trained = _context(monkeypatch, lambda s: table[s["lr"], s["seed"]])
    res = ctx.arm(_claim(), "glue/sst2", "a", {}, [0, 1])
    assert res.lr == 3e-3 and res.ties[0]["decided_by"] == "the next seed" and res.ties[0]["rates"] == [1e-3, 3e-3]
    assert sum(1 for s in trained if s["seed"] == 1 and s["lr"] == 3e-3) >= 1  # the tie-break run is seed 1's run
    assert res.search_seconds == 2.0 + 1.0  # the grid's other two runs and the tie-break run at the rate not chosen
    # a tie on both seeds: the lower validation loss of the search seed decides
    table2 = {(1e-3, 0): (0.835, 0.40), (3e-3, 0): (0.835, 0.35), (1e-2, 0): (0.80, 0.5),
              (1e-3, 1): (0.84, 0.4), (3e-3, 1): (0.84, 0.4)}
    ctx, _ = _context(monkeypatch, lambda s: table2[s["lr"], s["seed"]])
    res = ctx.arm(_claim(), "glue/sst2", "a", {}, [0])
    assert res.lr == 3e-3 and res.ties[0]["decided_by"] == "validation loss"


def test_the_ladder_searches_again_until_a_rate_learns_and_stops_rising(monkeypatch):
    """×1: every rate misses the gate; ×2: passes but the curve still rises at the cap (not converged); ×4: passes
    and flat: kept. Each budget searched the whole grid, at its own step cap."""
    from qkvtune.bench import scores

    ctx, trained = _context(monkeypatch, lambda s: {100: 0.5, 200: 0.8, 400: 0.9}[s["max_steps"]] - abs(s["lr"] - 3e-3),
                            {"lr_grid": {"lora": [1e-3, 3e-3, 1e-2]}, "lr_bounds": {"lora": [1e-3, 1e-2]},
                             "budgets": [1, 2, 4, 8], "rising": 0.01})
    monkeypatch.setattr(ctx, "gate", lambda claim, task, arm, run: (run.val_score >= 0.7, "test gate"))
    flat_at = 400
    monkeypatch.setattr(scores, "still_rising", lambda history, task, g, m, margin: m < flat_at)
    res, gate = ctx.ladder(_claim(), "glue/sst2", "a")
    assert gate[0] and ctx.budget["glue/sst2"] == 4 and res.lr == 3e-3
    steps = sorted({(s["max_steps"], s["lr"]) for s in trained})
    assert steps == [(m, lr) for m in (100, 200, 400) for lr in (1e-3, 3e-3, 1e-2)]  # the grid at every budget
    # this budget's other rates, and every run at the budgets not kept: ×1's grid, ×2's grid and its other seeds
    # (×2 passed, so seeds 1 and 2 ran there to check the gate in every seed)
    assert res.search_seconds == 2.0 + 3.0 + (3.0 + 2.0)


def test_the_ladder_wants_the_gate_passed_in_every_seed(monkeypatch):
    """×1: the search seed passes but seed 2 does not (one lucky seed is not a budget at which the arm learns):
    ×2 is tried; there every seed passes and it is kept. The other seeds run at the chosen rate only. Then: every
    seed passes at ×1 but one still rises at the cap there: not converged, ×2 is kept."""
    from qkvtune.bench import scores

    def ladder(table, rising):
        ctx, trained = _context(monkeypatch, lambda s: table[s["max_steps"], s["seed"]] - abs(s["lr"] - 3e-3),
                                {"lr_grid": {"lora": [1e-3, 3e-3, 1e-2]}, "lr_bounds": {"lora": [1e-3, 1e-2]},
                                 "budgets": [1, 2, 4], "rising": 0.01})
        monkeypatch.setattr(ctx, "gate", lambda claim, task, arm, run: (run.val_score >= 0.7, f"seed {run.seed}"))
        monkeypatch.setattr(scores, "still_rising", lambda history, task, g, m, margin: rising(history))
        return ctx, trained, *ctx.ladder(_claim(), "glue/sst2", "a")

    table = {(100, 0): 0.8, (100, 1): 0.75, (100, 2): 0.6, (200, 0): 0.85, (200, 1): 0.8, (200, 2): 0.78}
    ctx, trained, res, gate = ladder(table, lambda history: False)  # every curve flat: only the gate decides
    assert gate[0] and ctx.budget["glue/sst2"] == 2 and res.lr == 3e-3
    assert sorted((s["max_steps"], s["seed"]) for s in trained if s["seed"] != 0) == [(100, 1), (100, 2), (200, 1),
                                                                                       (200, 2)]
    assert all(s["lr"] == 3e-3 for s in trained if s["seed"] != 0)
    ctx, _, res, gate = ladder({**table, (100, 2): 0.75}, lambda history: history[-1]["eval_accuracy"] == 0.75)
    assert gate[0] and ctx.budget["glue/sst2"] == 2
    res = ctx.arm(_claim(), "glue/sst2", "a", {})  # the arm's seeds afterwards: at the kept budget
    assert {s: r.max_steps for s, r in res.runs.items()} == {0: 200, 1: 200, 2: 200}


def test_still_rising_at_the_cap():
    from qkvtune.bench.scores import still_rising

    curve = lambda *v: [{"step": 20 * (i + 1), "eval_accuracy": x} for i, x in enumerate(v)]
    assert still_rising(curve(0.67, 0.825, 0.83, 0.82, 0.86), "glue/sst2", 100, 100, 0.01)
    assert not still_rising(curve(0.67, 0.825, 0.83, 0.82, 0.835), "glue/sst2", 100, 100, 0.01)  # within the margin
    assert not still_rising(curve(0.67, 0.825, 0.83, 0.82, 0.86), "glue/sst2", 80, 100, 0.01)  # stopped before the cap
    loss = lambda *v: [{"step": 15 * (i + 1), "eval_loss": x} for i, x in enumerate(v)]
    assert still_rising(loss(2.0, 1.9, 1.8), "sft/chats.jsonl", 45, 45, 0.01)  # a loss still falling: improving
    assert not still_rising(loss(2.0, 1.8, 1.79), "sft/chats.jsonl", 45, 45, 0.01)


def test_every_paper_quote_names_its_row_and_matches_the_transcription():
    """Each claim's ``paper:`` quotes a table row of ``papers.md`` (its cells as printed there, under a heading that
    names the table) or words that appear in it verbatim; C10's LoRA Without Regret words are issue 23's."""
    import re

    from qkvtune.bench.suite import default_suite_dir

    path = os.path.join(os.path.dirname(data_dir() or "."), "reference", "papers.md")
    if data_dir() is None or not os.path.exists(path):
        pytest.skip("papers.md (shared/reference) not found")
    text = open(path, encoding="utf-8").read()
    issue_23 = ('"LoRA Without Regret" (Schulman et al., Thinking Machines, 2025) finds attention-only LoRA '
                'underperforms even at matched parameter count, the MLP matters most, and LoRA\'s best rate is ~10× '
                'full fine-tuning\'s')
    tables, heading, block = [], "", []
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            heading = line
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append((heading, block[0], block[2:]))
            block = []
    flat = lambda s: re.sub(r"\s+", " ", s)
    _, claims = load_suite(default_suite_dir())
    for claim in claims:
        assert isinstance(claim.paper, list) and claim.paper, f"{claim.id}: paper: quotes, not a free line"
        for q in claim.paper:
            if "text" in q:
                where = issue_23 if "issue 23" in q.get("source", "") else text
                assert flat(q["text"]) in flat(where), f"{claim.id}: not verbatim: {q['text']!r}"
                continue
            row = [q["row"]] if isinstance(q["row"], str) else list(q["row"])
            found = [(h, header, r) for h, header, rows in tables if q["table"] in h for r in rows
                     if r[:len(row)] == row and all(k in header for k in q["cells"])]
            assert found, f"{claim.id}: no row {row} under a heading naming {q['table']!r} with {list(q['cells'])}"
            assert any(all(r[header.index(k)] == v for k, v in q["cells"].items()) for _, header, r in found), \
                f"{claim.id}: {row}: {q['cells']} differ from papers.md"


def test_the_reviewer_table_names_unit_tests_that_exist():
    """Every test the report names as "the unit test that makes a check of this kind fail" is a test of this suite."""
    import ast
    import pathlib

    from qkvtune.bench.report import FAILS_IN

    here = pathlib.Path(__file__).parent
    named = {t.strip().split(" ")[0] for _, tests in FAILS_IN for t in tests.split(", ")}
    for name in named:
        file, _, fn = name.partition("::")
        tree = ast.parse((here / file).read_text())
        assert fn in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, name


def test_smt_warmup_counted_inside_the_step_cap(monkeypatch):
    """``warmup_in_cap``: SMT's warm-up steps come out of the arm's step cap at every budget (v3 ran them on top,
    and the head trained longer than LoRA's); a warm-up that leaves no step is refused by claim and arm."""
    from qkvtune.bench.suite import Claim

    ctx, _ = _context(monkeypatch, lambda s: 0.8)
    claim = Claim(id="C6", title="t", tasks=["glue.0"], base={"max_steps": 100},
                  arms={"lora": {"method": "lora"}, "smt": {"method": "smt", "smt_warmup_steps": 20,
                                                           "warmup_in_cap": True}})
    assert ctx.settings(claim, "glue/sst2", "lora", 0)["max_steps"] == 100
    smt = ctx.settings(claim, "glue/sst2", "smt", 0)
    assert smt["max_steps"] + smt["smt_warmup_steps"] == 100 and "warmup_in_cap" not in smt
    ctx.budget["glue/sst2"] = 2
    assert ctx.settings(claim, "glue/sst2", "smt", 0)["max_steps"] == 180
    claim.arms["smt"]["smt_warmup_steps"] = 250
    with pytest.raises(ConfigError, match="C6 arm smt: warmup_in_cap"):
        ctx.settings(claim, "glue/sst2", "smt", 0)


def test_a_profile_can_run_a_documented_subset_of_a_claims_arms():
    """``arms: {C10: [mlp, qkvo_eqp]}`` keeps those arms (the reference falls to the first kept one when dropped);
    a check on a dropped arm reads "not run in this profile", not a verdict; an unknown arm is refused by name."""
    from qkvtune.bench.claims import ClaimResult, evaluate_check, keep_arms
    from qkvtune.bench.suite import default_suite_dir

    _, claims = load_suite(default_suite_dir())
    c10 = next(c for c in claims if c.id == "C10")
    sub = keep_arms(c10, ["mlp", "qkvo_eqp"])
    assert list(sub.arms) == ["mlp", "qkvo_eqp"] and sub.ref == "mlp" and "qv" in sub.dropped
    result = ClaimResult(sub, ["sft/x"], [0, 1], {}, {}, [], V.UNSURE, gates={"sft/x": (True, "")})
    part = evaluate_check(result, {"rule": "better", "a": "score:mlp", "b": "score:qv_eqp", "margin": 0.01})
    assert part["verdict"] == V.NOT_RUN and "not run in this profile: qv_eqp" in part["note"]
    on = {"rule": "better", "a": "score:mlp", "b": "score:qkvo_eqp", "margin": 0.01, "task": "glue.0", "_task": None}
    part = evaluate_check(result, {**on, "_found": "glue/sst2"})  # the task exists; the profile left it out
    assert part["verdict"] == V.NOT_RUN and "glue/sst2 not among this profile's tasks" in part["note"]
    part = evaluate_check(result, {**on, "_found": None})  # no such task in the data folder at all
    assert part["verdict"] == V.UNTESTABLE and "no such task in the data folder" in part["note"]
    with pytest.raises(ConfigError, match="C10 has no arm 'mlpx'"):
        keep_arms(c10, ["mlpx"])


def test_the_time_bound_expects_a_run_to_grow_with_its_budget():
    from qkvtune.bench.runner import expected_seconds

    assert expected_seconds({}, 1) == 0.0
    longest = {1.0: 26.0, 2.0: 40.0, 4.0: 60.0}  # as measured by --profile quick on a task it cannot learn
    assert expected_seconds(longest, 8) == pytest.approx(120.0)  # the nearest budget's longest, doubled (was 109 s)
    assert expected_seconds(longest, 2) == 40.0
    assert expected_seconds({4.0: 60.0}, 1) == pytest.approx(15.0)


def test_a_shared_reference_search_is_counted_once_in_the_reports_minutes():
    from types import SimpleNamespace as NS

    from qkvtune.bench.report import search_minutes
    from qkvtune.bench.runner import ArmResult

    runs = {1e-3: NS(dir="a"), 3e-3: NS(dir="b")}
    shared = [ArmResult(None, [(1e-3, 0.5), (3e-3, 0.52)], {}, 600.0, grid_runs=runs) for _ in range(2)]
    own = ArmResult(3e-3, [(1e-3, 0.7), (3e-3, 0.8)], {}, 120.0, grid_runs={1e-3: NS(dir="c"), 3e-3: NS(dir="d")})
    results = [NS(arms={"glue/sst2": {"qv": shared[0], "v": own}}), NS(arms={"glue/sst2": {"k": shared[1]}})]
    assert search_minutes(results) == pytest.approx((600.0 + 120.0) / 60)  # not 2 × 600 for the shared ladder


def test_the_time_bound_keeps_room_for_the_claims_scoring_after_its_last_run():
    import time

    from qkvtune.bench import runner

    ctx = runner.Runner({}, {"glue": ["glue/sst2"]}, [0], None, "unused", lambda msg: None, max_minutes=1)
    ctx.begin_claim()
    ctx.claim_runs, ctx.last_run_end = 3, time.monotonic() - 6.0  # a claim of 3 runs scored for 6 s after them
    ctx.end_claim()
    assert ctx.wrapup == pytest.approx(2.0, abs=0.5)
    ctx.started, ctx.longest, ctx.factor = time.monotonic() - 30.0, {1.0: 10.0}, 1.0
    ctx.begin_claim()
    ctx.claim_runs = 9  # 30 s gone + a 10-s run + (9 + 1) runs' scoring at ~2 s: past the 60-s bound
    with pytest.raises(runner.OutOfTime, match="scoring"):
        ctx.may_train()
    ctx.claim_runs = 2  # 30 + 10 + 3 × ~2 s: inside it
    ctx.may_train()
    ctx.wrapup, ctx.claim_runs = 0.0, 9  # without the reserve the same claim would start its run
    ctx.may_train()
