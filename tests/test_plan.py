"""``qkvtune plan`` on a tiny BERT: the files it writes, a plan.yaml that trains as it is, one real SGD step
against the kernel's prediction (the time map), and bad input in one line with nothing written. The closed form
itself is tested in test_kernel_sim.py."""

import json

import pytest
import torch
import yaml

from conftest import data_dir, run_cli
from qkvtune.config import build_config, load_config
from qkvtune.plan import Candidate, candidates, kernel_time, scores

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def test_candidate_grid_and_scores():
    grid = candidates()
    names = [c.name for c in grid]
    assert "v λ=1" in names and "q,v λ=8" in names and "q,k,v,o λ=2" in names
    assert len(grid) == 1 + 3 * 4 and not any(c.targets == ("v",) and c.lr_ratio != 1 for c in grid)
    assert Candidate(("q", "k", "v"), 4.0).rates() == {"q": 1.0, "k": 1.0, "v": 4.0}
    out = torch.tensor([[[0.5], [-1.0], [2.0]], [[-0.5], [-1.0], [2.0]]], dtype=torch.float64)
    assert scores(out, torch.tensor([1, 0, 0])).tolist() == pytest.approx([2 / 3, 1 / 3])
    reg = scores(out, torch.tensor([1.0, 0.0, 3.0]))
    assert reg[0] == pytest.approx(float(torch.corrcoef(torch.stack([out[0, :, 0], torch.tensor([1.0, 0.0, 3.0],
                                                                                          dtype=torch.float64)]))[0, 1]))
    assert kernel_time(torch.tensor([1.0, 2.0, 3.0]), 0.5).tolist() == [0.5, 1.5, 3.0]


@needs_data
def test_plan_writes_a_config_train_accepts(tmp_path, tiny_bert_dir):
    out = tmp_path / "plan"
    common = [f"model={tiny_bert_dir}", "task=glue/sst2", f"data_dir={data_dir()}", "max_train_samples=64",
              "val_size=24", "max_steps=12", "eval_strategy=steps", "eval_steps=4", "batch_size=8", "lr=1e-3"]
    r = run_cli("plan", *common, "--out", str(out), "--n", "32", "--m", "24", "--calibration-steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "plan.json"))
    assert len(summary["candidates"]) == 13 and sorted(summary["ranking"]) == sorted(c.name for c in candidates())
    for row in summary["candidates"]:
        assert row["steps"] == [4, 8, 12] and len(row["val_score"]) == 3
        assert row["best_score"] == max(row["val_score"]) and row["best_step"] in row["steps"]
    best = {r["name"]: r for r in summary["candidates"]}[summary["ranking"][0]]
    assert best["best_score"] == max(r["best_score"] for r in summary["candidates"])
    assert summary["time_scale"]["scale"] > 0 and summary["n_train"] == 32 and summary["n_val"] == 24
    for f in ("plan.md", "plan_curves.png", "plan_spectra.png"):
        assert (out / f).exists()
    assert not (tmp_path / "plan.partial").exists()
    cfg = load_config(str(out / "plan.yaml"))
    rec = summary["recommended"]
    assert cfg.targets == rec["targets"] and cfg.lr_ratio == rec["lr_ratio"] and cfg.max_steps == best["best_step"]
    trained = run_cli("train", str(out / "plan.yaml"), f"output_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert yaml.safe_load(open(tmp_path / "run" / "config.yaml"))["targets"] == rec["targets"]
    # bad input: one line, exit 2, nothing written
    r = run_cli("plan", *common, "method=smt", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qkvtune: error: method:")
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--n", "0")
    assert r.returncode == 2 and "--n" in r.stderr
    r = run_cli("plan", *common, "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--label-words", "no,yes")
    assert r.returncode == 2 and "--label-words: only for causal LM" in r.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


@needs_data
def test_one_sgd_step_moves_the_outputs_as_the_kernel_says(tmp_path, tiny_bert_dir):
    """The time map for SGD, derived: one step at rate lr moves the outputs by −(lr/n)·K·∂L/∂f, with K the eNTK
    of the trained slices and ∂L/∂f the loss's own residual (cross-entropy on the margin: σ(f) − y). Measured:
    a real Trainer step of plain SGD on dense q, v deltas (the calibration run's settings: head frozen, full
    batch) against that prediction. The plan's square loss on ±1 targets differs from cross-entropy by a
    factor that depends on f₀ and the labels; the calibrated scale s absorbs it."""
    from qkvtune.analysis.ntk import empirical_ntk
    from qkvtune.analysis.ntk import outputs
    from qkvtune.plan import calibration_config
    from qkvtune.runs import open_run, pretrained
    from qkvtune.train import train

    lr, n = 0.05, 32
    cfg = build_config(dict(model=str(tiny_bert_dir), task="glue/sst2", data_dir=data_dir(), max_train_samples=64,
                            val_size=16, method="dense", optim="sgd", lr=lr, batch_size=n, targets=["q", "v"],
                            output_dir=str(tmp_path / "unused")))
    run = pretrained(cfg, n_train=n, n_eval=16)
    examples = run.examples("train", n)
    res = empirical_ntk(run.model, examples, run.targets, collator=run.task.collator, output="margin")
    train(calibration_config(cfg, str(tmp_path / "step"), 1, n))
    stepped = open_run(str(tmp_path / "step"), n_train=n, n_eval=1)
    moved = outputs(stepped.model, examples, run.task.collator, "margin")[:, 0] - res.f0[:, 0]
    predicted = -(lr / n) * res.kernel @ (torch.sigmoid(res.f0[:, 0]) - res.labels.double())
    assert float(moved.norm() / predicted.norm()) == pytest.approx(1.0, abs=0.03)
    assert float(torch.nn.functional.cosine_similarity(moved, predicted, dim=0)) > 0.99


@needs_data
def test_bench_plan_against_its_grid(tmp_path, tiny_bert_dir, tiny_llama_dir):
    """bench plan on a three-candidate grid: every candidate trained with its searched rate, the plan made at
    the reference's rate, its pick trained as plan.yaml says; the figures follow from the recorded runs."""
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "suite.yaml").write_text(yaml.safe_dump({
        "seeds": [0], "prefer": {"glue": ["sst2"]},
        "families": {"glue": {"model": str(tiny_bert_dir), "max_train_samples": 48, "val_size": 16,
                              "max_eval_samples": 24, "max_steps": 6, "batch_size": 8, "eval_strategy": "steps",
                              "eval_steps": 2, "logging_steps": 2}},
        "lr_grid": {"lora": [1e-3, 1e-2]}, "gate": {"over_constant": -1.0}}))
    out = tmp_path / "out"
    r = run_cli("bench", "plan", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(out), "--n", "24",
                "--m", "16", "--kinds", "v;q,v", "--lambdas", "1,4", "--cost-ns", "16",
                "--cost-models", f"{tiny_bert_dir},{tiny_llama_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.load(open(out / "PLAN.json"))
    (task,) = record["tasks"]
    assert task["candidates"] == ["v λ=1", "q,v λ=1", "q,v λ=4"]
    runs = [json.load(open(p)) for p in out.glob("runs/*/claims_run.json")]
    for name, real in task["real"].items():
        grid = [x for x in runs if x["arm"] == name]
        assert sorted(x["settings"]["lr"] for x in grid) == [1e-3, 1e-2]  # each candidate searched its rate
        best = max(x["val_score"] for x in grid)  # a tie goes to the lower validation loss, never to order
        assert real["val_score"] == best and real["lr"] in [x["settings"]["lr"] for x in grid if x["val_score"] == best]
    plan = json.load(open(out / task["plan_dir"] / "plan.json"))
    assert plan["lr"] == task["real"]["q,v λ=1"]["lr"]  # the plan's η_Q: the reference's searched rate
    assert task["predicted"] == {c["name"]: c["best_score"] for c in plan["candidates"]}
    (picked,) = [x for x in runs if x["arm"] == "plan"]
    rec = plan["recommended"]
    assert picked["settings"]["targets"] == rec["targets"] and picked["settings"]["max_steps"] == rec["max_steps"]
    assert task["pick_test"] == picked["score"]
    assert task["grid_best"] == max(task["real"], key=lambda k: task["real"][k]["val_score"])
    assert task["pick_minus_grid_best"] == pytest.approx(picked["score"] - task["real"][task["grid_best"]]["test_score"])
    from qkvtune.bench.plan import spearman

    names = task["candidates"]
    assert [b["lr"] for b in task["by_rate"]] == [1e-3, 1e-2] and plan["lr"] in (1e-3, 1e-2)
    for b in task["by_rate"]:  # every candidate at one rate: predicted at that rate, against the grid's run there
        assert b["predicted"] == {k: plan["by_rate"][f"{b['lr']:g}"][k]["best_score"] for k in names}
        for k in names:
            assert b["real"][k] == next(x["val_score"] for x in runs if x["arm"] == k and x["settings"]["lr"] == b["lr"])
    # at the plan's own rate, by_rate repeats the plan's curves
    assert plan["by_rate"][f"{plan['lr']:g}"] == {c["name"]: {"best_score": c["best_score"], "best_step": c["best_step"]}
                                                  for c in plan["candidates"]}
    assert task["spearman"] == spearman([task["predicted"][k] for k in names],
                                        [task["real"][k]["val_score"] for k in names]) or \
        (task["spearman"] != task["spearman"])  # nan when either side is constant
    assert [c["model"] for c in record["cost"]] == [tiny_bert_dir, tiny_llama_dir]
    for cost in record["cost"]:
        assert cost["n"] == 16 and cost["kernel_seconds"] > 0 and cost["lora_epoch_seconds"] > 0
        assert cost["examples"] == 16 + 16 and cost["sketch_dim"] is None
    assert (out / "PLAN.md").exists() and (out / "PLAN_cost.png").exists()
    r = run_cli("bench", "plan", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(tmp_path / "cs"),
                "--tasks", "commonsense/boolq")
    assert r.returncode == 2 and "--label-words" in r.stderr.strip().splitlines()[-1]


def test_label_word_examples_cut_before_the_label_word(tiny_llama_dir):
    """A causal LM's SFT examples read as prompt-based classification: each cut just before the first label
    word of its response, labelled by that word; f₀ of the kernel is the label-word logit margin at the end of
    the prompt, as a forward pass on each prompt alone (no padding) gives it."""
    from transformers import AutoModelForCausalLM

    from qkvtune.analysis.ntk import empirical_ntk, label_word_examples
    from qkvtune.data import PadCollator
    from qkvtune.models import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    no, yes = (tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ("false", "true"))
    other = tok(" the", add_special_tokens=False)["input_ids"][0]
    examples = [  # prompt (labels -100), then the response
        {"input_ids": [5, 6, 7, yes, other, yes], "labels": [-100, -100, -100, yes, other, yes]},
        {"input_ids": [5, 8, no, other, no], "labels": [-100, -100, -100, other, no]},  # the prompt's word is not read
        {"input_ids": [5, 9, other], "labels": [-100, -100, other]},                    # no label word: left out
    ]
    cut, dropped = label_word_examples(examples, [no, yes])
    assert dropped == 1
    assert [c["input_ids"] for c in cut] == [[5, 6, 7], [5, 8, no, other]] and [c["labels"] for c in cut] == [1, 0]
    assert cut[1]["attention_mask"] == [1, 1, 1, 1]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double()
    from qkvtune.targets import find_targets

    res = empirical_ntk(model, cut, find_targets(model, ["q", "v"]), collator=PadCollator(tok), output="margin",
                        label_token_ids=[no, yes], dtype=torch.float64)
    for i, ex in enumerate(cut):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0, -1]
        assert float(res.f0[i, 0]) == pytest.approx(float(logits[yes] - logits[no]), abs=1e-9)
    assert res.labels.tolist() == [1, 0]


@needs_data
def test_plan_with_label_words_on_a_causal_lm(tmp_path, tiny_llama_dir):
    """plan on a causal LM with a prompt (BoolQ in the LLM-Adapters layout): the kernel reads the label words'
    margin where the answer word is predicted, and the plan.yaml trains as it is. Label words on a classifier,
    or words no response contains: one line, exit 2, nothing written."""
    out = tmp_path / "plan"
    common = [f"model={tiny_llama_dir}", "task=commonsense/boolq", f"data_dir={data_dir()}", "max_train_samples=40",
              "val_size=16", "max_eval_samples=8", "max_steps=6", "eval_strategy=steps", "eval_steps=3",
              "batch_size=4", "lr=1e-3", "max_length=96", "max_new_tokens=4"]
    r = run_cli("plan", *common, "--out", str(out), "--n", "24", "--m", "16", "--calibration-steps", "2",
                "--label-words", "false,true", "--kinds", "v;q,v", "--lambdas", "1,4")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "plan.json"))
    assert summary["output"] == "margin" and summary["label_words"] == "false,true"
    assert summary["n_train"] == 24 and summary["n_val"] == 16 and len(summary["candidates"]) == 3
    assert summary["time_scale"]["moved"] > 0 and summary["time_scale"]["scale"] > 0
    trained = run_cli("train", str(out / "plan.yaml"), f"output_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--label-words", "maybe,perhaps")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qkvtune: error: --label-words:")
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "--label-words" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
