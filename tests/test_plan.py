"""``qkvtune plan`` on tiny models: the files it writes, a plan.yaml that trains as it is, one real SGD step
against the kernel's prediction (head included), the head's kernel and the language model's token kernel against
explicit gradients, the method's kernel factors against explicit LoRA gradients, the budget extension, and bad
input in one line with nothing written. The simulation itself is tested in test_kernel_sim.py."""

import json
import math

import pytest
import torch
import yaml

from conftest import data_dir, run_cli, tiny
from qkvtune.config import build_config, load_config
from qkvtune.plan import Candidate, candidates
from qkvtune.plan.readout import metric_of

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def test_candidate_grid_groups_rates_and_scores():
    grid = candidates()
    names = [c.name for c in grid]
    assert "v λ=1" in names and "q,v λ=8" in names and "mlp λ=1" in names and "all-linear λ=4" in names
    assert len(grid) == 1 + 3 * 4 + 1 + 4 and not any(c.targets in (("v",), ("mlp",)) and c.lr_ratio != 1 for c in grid)
    assert Candidate(("q", "k", "v"), 4.0).rates() == {"q": 1.0, "k": 1.0, "v": 4.0}
    bert = ["q", "k", "v", "o", "up", "down"]
    assert Candidate(("mlp",), 1.0).rates(bert, 2e-3, lr_mlp_ratio=3) == {"up": 6e-3, "down": 6e-3}
    assert Candidate(("all-linear",), 2.0).rates(bert, 1e-3) == {"q": 1e-3, "k": 1e-3, "v": 2e-3, "o": 1e-3,
                                                                 "up": 1e-3, "down": 1e-3}
    assert [Candidate(t, 1.0).group for t in (("q", "v"), ("mlp",), ("all-linear",), ("v", "up"))] == \
        ["attention only", "MLP only", "all-linear", "mixed"]
    out = torch.tensor([[[0.5], [-1.0], [2.0]], [[-0.5], [-1.0], [2.0]]], dtype=torch.float64)
    labels = torch.tensor([1, 0, 0])
    assert metric_of("accuracy", "binary_ce", out, labels).tolist() == pytest.approx([2 / 3, 1 / 3])
    reg = metric_of("pearson", "mse", out, torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    assert reg[0] == pytest.approx(float(torch.corrcoef(torch.stack([out[0, :, 0], torch.tensor([1.0, 0.0, 3.0],
                                                                                          dtype=torch.float64)]))[0, 1]))
    lm = metric_of("loss", "token", out, None)
    assert lm[0] == pytest.approx(float(torch.nn.functional.softplus(-out[0, :, 0]).mean()))


@needs_data
def test_plan_writes_a_config_train_accepts(tmp_path, tiny_bert_dir):
    out = tmp_path / "plan"
    common = [f"model={tiny_bert_dir}", "task=glue/sst2", f"data_dir={data_dir()}", "max_train_samples=64",
              "val_size=24", "max_steps=12", "eval_strategy=steps", "eval_steps=4", "batch_size=8", "lr=auto"]
    r = run_cli("plan", *common, "--out", str(out), "--n", "32", "--m", "24", "--calibration-steps", "4",
                "--kinds", "v;q,v;mlp;all-linear", "--lambdas", "1,4", "--lrs", "1e-3,1e-2", "--max-budget", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "plan.json"))
    names = ["v λ=1", "q,v λ=1", "q,v λ=4", "mlp λ=1", "all-linear λ=1", "all-linear λ=4"]
    assert sorted({row["name"] for row in summary["candidates"]}) == sorted(names)
    assert len(summary["candidates"]) == 2 * len(names) and summary["lrs"] == [1e-3, 1e-2]
    assert summary["heads"] == ["classifier"] and "head" in summary["spectrum"]["per_kind"]
    assert set(summary["kinds"]) >= {"q", "k", "v", "o", "up", "down"}
    for row in summary["candidates"]:
        assert row["steps"] == [4, 8, 12] and len(row["val_score"]) == 3 and row["edge_ratio"] >= 0
        if row["unstable"]:
            assert row["best_score"] == summary["baseline"]
        else:
            assert row["best_score"] == max(row["val_score"]) and row["best_step"] in row["steps"]
    stable = [r for r in summary["candidates"] if not r["unstable"]]
    first = summary["candidates"][0]  # ranked: stable ones first, the best predicted score first
    assert not stable or (not first["unstable"] and first["best_score"] == max(r["best_score"] for r in stable))
    params = summary["parameters"]
    # r·(rows + in) per slice: k, o (32×32) in 2 layers, and BERT's pooler (32×32), which all-linear takes whole
    assert params["all-linear λ=1"] == params["q,v λ=1"] + params["mlp λ=1"] + 2 * 2 * 8 * 64 + 8 * 64
    assert summary["time_scale"]["scale"] > 0 and summary["n_train"] == 32 and summary["n_val"] == 24
    assert set(summary["groups"]) == {"attention only", "MLP only", "all-linear"}
    for f in ("plan.md", "plan_curves.png", "plan_spectra.png"):
        assert (out / f).exists()
    text = (out / "plan.md").read_text()
    assert "the kernel expects" in text or "expects no group" in text
    assert not (tmp_path / "plan.partial").exists()
    cfg = load_config(str(out / "plan.yaml"))
    rec = summary["recommended"]
    assert cfg.targets == rec["targets"] and cfg.lr_ratio == rec["lr_ratio"] and cfg.lr == rec["lr"] == "auto"
    assert cfg.max_steps == rec["max_steps"]
    # lr: auto — the calibration run's chosen rate is the plan's lr; plan.yaml trains at lr: auto on its own targets
    calib = yaml.safe_load(open(out / "calibration" / "config.yaml"))
    assert summary["lr"] == calib["lr"] == calib["lr_auto"]["lr"] and isinstance(summary["lr"], float)
    assert rec["kernel_lr"] in summary["lrs"] and "default" in rec
    trained = run_cli("train", str(out / "plan.yaml"), f"output_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    ran = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert ran["targets"] == rec["targets"] and ran["lr"] == ran["lr_auto"]["lr"]
    # bad input: one line, exit 2, nothing written
    r = run_cli("plan", *common, "method=smt", "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qkvtune: error: method:")
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--n", "0")
    assert r.returncode == 2 and "--n" in r.stderr
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--lrs", "1e-3,x")
    assert r.returncode == 2 and "--lrs" in r.stderr
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--kinds", "q,all-linear")
    assert r.returncode == 2 and "--kinds" in r.stderr
    r = run_cli("plan", *common, "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--label-words", "no,yes")
    assert r.returncode == 2 and "--label-words: only for causal LM" in r.stderr
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


@needs_data
def test_one_sgd_step_moves_the_outputs_as_the_kernel_says(tmp_path, tiny_bert_dir):
    """The time map for SGD, derived: one step at rate lr moves the outputs by −(lr/n)·K·∂L/∂f, with K the eNTK
    of the trained slices and of the task head (its weight and bias, trained in the same step) and ∂L/∂f the
    loss's own residual (cross-entropy on the margin: σ(f) − y). Measured: a real Trainer step of plain SGD on
    dense q, v deltas and the head (the calibration run's settings, full batch) against that prediction."""
    from qkvtune.analysis.ntk import empirical_ntk, outputs
    from qkvtune.plan.simulate import calibration_config
    from qkvtune.runs import open_run, pretrained
    from qkvtune.train import train

    lr, n = 0.05, 32
    cfg = build_config(dict(model=str(tiny_bert_dir), task="glue/sst2", data_dir=data_dir(), max_train_samples=64,
                            val_size=16, method="dense", optim="sgd", lr=lr, batch_size=n, targets=["q", "v"],
                            output_dir=str(tmp_path / "unused")))
    run = pretrained(cfg, n_train=n, n_eval=16)
    examples = run.examples("train", n)
    res = empirical_ntk(run.model, examples, run.targets, collator=run.task.collator, output="margin",
                        heads=run.heads)
    assert set(res.per_kind) == {"q", "v", "head"}
    train(calibration_config(cfg, str(tmp_path / "step"), 1, n))
    stepped = open_run(str(tmp_path / "step"), n_train=n, n_eval=1)
    moved = outputs(stepped.model, examples, run.task.collator, "margin")[:, 0] - res.f0[:, 0]
    residual = torch.sigmoid(res.f0[:, 0]) - res.labels.double()
    predicted = -(lr / n) * res.kernel @ residual
    assert float(moved.norm() / predicted.norm()) == pytest.approx(1.0, abs=0.03)
    assert float(torch.nn.functional.cosine_similarity(moved, predicted, dim=0)) > 0.99
    without_head = -(lr / n) * (res.per_kind["q"] + res.per_kind["v"]) @ residual
    assert float((moved - without_head).norm()) > 10 * float((moved - predicted).norm())


def test_head_kernel_equals_explicit_gradients():
    """The head's kernel (kind ``head``: its linear layer's weight and bias) of a classifier's margin and of its
    logits against per-example gradients by autograd; the slices' kernels are unchanged by adding it."""
    from qkvtune.analysis.ntk import empirical_ntk
    from qkvtune.targets import find_targets

    for labels in (2, 3):
        model = tiny("bert", num_labels=labels).double()
        x = torch.randint(2, 64, (5, 6))
        data = {"input_ids": x, "attention_mask": torch.ones_like(x)}
        output = "margin" if labels == 2 else "logits"
        targets = find_targets(model, ["v"])
        res = empirical_ntk(model, data, targets, output=output, heads=["classifier"], dtype=torch.float64)
        plain = empirical_ntk(model, data, targets, output=output, dtype=torch.float64)
        assert torch.allclose(res.per_kind["v"], plain.per_kind["v"], atol=1e-10)
        head = model.classifier
        grads = []
        for i in range(len(x)):
            logits = model(input_ids=x[i:i + 1]).logits[0]
            rows = []
            for f in ([logits[1] - logits[0]] if labels == 2 else list(logits)):
                gw, gb = torch.autograd.grad(f, [head.weight, head.bias], retain_graph=True)
                rows.append(torch.cat([gw.reshape(-1), gb]))
            grads.append(torch.stack(rows))
        g = torch.stack(grads)  # (examples, outputs, parameters)
        explicit = torch.einsum("icp,jcp->ij", g, g)  # summed over outputs, as the kernel is
        assert torch.allclose(res.per_kind["head"], explicit, atol=1e-9)


def test_lora_kernel_factor_and_growth_against_explicit_lora_gradients():
    """LoRA's kernel at initialisation (only B moves) is s²·r/(3·in) times the weights' in expectation over PEFT's
    random A; once B has entries of root mean square σ, A's kernel is s²·r·σ² times the weights' in expectation
    over B. Both against explicit per-example gradients of a real LoRA delta, averaged over draws."""
    from qkvtune import attach
    from qkvtune.analysis.ntk import empirical_ntk
    from qkvtune.deltas import delta_class
    from qkvtune.targets import find_targets

    model = tiny("bert", num_labels=2).double()
    x = torch.randint(2, 64, (4, 6))
    data = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    targets = find_targets(model, ["v"])
    weights = empirical_ntk(model, data, targets, output="margin", dtype=torch.float64).kernel
    cfg = build_config({"model": "x", "task": "glue/sst2", "rank": 4, "alpha": 8, "output_dir": "unused"})
    t = targets[0]
    factor, moving = delta_class("lora").kernel_factor(cfg, t.rows.size, t.in_features)
    assert moving == 4 * t.rows.size * 1 and factor == pytest.approx(2.0 ** 2 * 4 / (3 * t.in_features))
    gamma, power = delta_class("lora").kernel_growth(cfg, t.rows.size, t.in_features, "sgd")
    b_kernels, a_kernels, sigma = [], [], 0.05
    for draw in range(300):
        torch.manual_seed(draw)
        name = f"d{draw}"
        attach.add_adapter(model, targets, "lora", name=name, rank=4, alpha=8.0)
        res = empirical_ntk(model, data, targets, adapter=name, output="margin", dtype=torch.float64)
        b_only = res.kernel  # B = 0: A's gradient is 0
        for _, d in attach.iter_deltas(model, name):
            d.lora_B.data.normal_(0, sigma)
            d.lora_A.data.zero_()  # now only A's gradient carries B (∂f/∂B = s·G·Aᵀ = 0)
        a_only = empirical_ntk(model, data, targets, adapter=name, output="margin", dtype=torch.float64).kernel
        attach.delete_adapter(model, name)
        b_kernels.append(b_only)
        a_kernels.append(a_only)
    mean_b, mean_a = torch.stack(b_kernels).mean(0), torch.stack(a_kernels).mean(0)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(mean_b, factor * weights) < 0.1
    # A's kernel, relative to B's at initialisation: SGD's growth term γ·σ^p
    assert rel(mean_a, gamma * sigma ** power * factor * weights) < 0.1


@needs_data
def test_a_plan_scored_by_accuracy_on_an_f1_task(tmp_path, tiny_bert_dir):
    """The suite's gate reads accuracy on MRPC (main metric F1): a plan asked for accuracy scores every candidate,
    its constant predictor and its goal in accuracy — the majority class's share of the validation labels."""
    from qkvtune.config import ConfigError
    from qkvtune.plan import plan

    cfg = build_config({"model": tiny_bert_dir, "task": "glue/mrpc", "data_dir": data_dir(), "max_train_samples": 32,
                        "val_size": 24, "max_steps": 8, "eval_strategy": "steps", "eval_steps": 4, "batch_size": 8,
                        "lr": 1e-3, "output_dir": str(tmp_path / "unused")})
    kw = dict(n=32, m=24, calibration_steps=2, cands=[Candidate(("q", "v"), 1.0)], lrs=[1e-3], max_budget=1,
              log=lambda *_: None)
    summary = plan(cfg, str(tmp_path / "plan"), metric="accuracy", goal=0.99, **kw)
    written = json.load(open(tmp_path / "plan" / "plan.json"))
    assert written["metric"] == summary["metric"] == "accuracy" and summary["goal"] == 0.99
    f1 = plan(cfg, str(tmp_path / "f1"), **kw)
    assert f1["metric"] == "f1"
    # the same kernel and simulation: the constant predictor's F1 (all positive) sits above its accuracy on MRPC
    share = summary["baseline"]
    assert 0.5 <= share < 1 and f1["baseline"] == pytest.approx(2 * share / (1 + share))
    with pytest.raises(ConfigError, match="metric"):
        plan(cfg, str(tmp_path / "bad"), metric="loss", **kw)


@needs_data
def test_bench_plan_against_its_grid(tmp_path, tiny_bert_dir, tiny_llama_dir):
    """bench plan on a three-candidate grid × two rates × two seeds: every grid point trained on every seed, the
    plan made at the reference's searched rate choosing among the same rates, its pick trained as plan.yaml says;
    the figures (Spearman, the seeds' reliability, divergences, the pick's gap, compute) follow from the recorded
    runs."""
    from qkvtune.bench.plan_grid import diverged, reliability, spearman
    from qkvtune.bench.runner import SuiteRun

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
                "--m", "16", "--kinds", "v;q,v;mlp", "--lambdas", "1,4", "--grid-kinds", "v;q,v", "--seeds", "0,1",
                "--tasks", "glue/sst2", "--check-budget", "glue/sst2", "--cost-ns", "16", "--cost-models", f"{tiny_bert_dir},{tiny_llama_dir}")
    assert r.returncode == 0, r.stderr[-3000:]
    record = json.load(open(out / "PLAN.json"))
    (task,) = record["tasks"]
    runs = [json.load(open(p)) for p in out.glob("runs/*/claims_run.json")]
    assert len([x for x in runs if x["task"] == "glue/sst2" and x["arm"] in ("v λ=1", "q,v λ=1", "q,v λ=4")]) == 12
    names = {x["candidate"] for x in task["rows"]}
    assert names == {"v λ=1", "q,v λ=1", "q,v λ=4"} and task["rates"] == [1e-3, 1e-2] and task["points"] == 6
    plan = json.load(open(out / task["plan_dir"] / "plan.json"))
    assert plan["lrs"] == [1e-3, 1e-2] and plan["lr"] == task["reference_lr"]
    assert {r["name"] for r in plan["candidates"]} == names | {"mlp λ=1"}  # the plan predicts more than was trained
    for row in task["rows"]:
        mine = [x for x in runs if x["arm"] == row["candidate"] and x["settings"]["lr"] == row["lr"]
                and x["task"] == "glue/sst2"]
        assert sorted(x["seed"] for x in mine) == [0, 1]
        assert row["seeds"] == [x["val_score"] for x in sorted(mine, key=lambda x: x["seed"])]
        assert row["real"] == pytest.approx(sum(row["seeds"]) / 2)
        p = next(c for c in plan["candidates"] if c["name"] == row["candidate"] and c["lr"] == row["lr"])
        assert row["predicted"] == p["best_score"] and row["unstable"] == p["unstable"]
        assert row["diverged"] == [diverged(SuiteRun(**{k: x[k] for k in ("task", "arm", "seed", "metrics", "score",
                                                                       "val_score", "history", "seconds")}, dir=""))
                                   for x in sorted(mine, key=lambda x: x["seed"])]
    rows = task["rows"]
    number = lambda x: math.nan if x is None else x  # JSON holds a non-finite figure as null
    assert number(task["spearman_full"]) == pytest.approx(spearman([x["predicted"] for x in rows], [x["real"] for x in rows]),
                                                  nan_ok=True)
    assert number(task["reliability_full"]) == pytest.approx(reliability([x["seeds"] for x in rows]), nan_ok=True)
    s = [[0.8, 0.82], [0.7, 0.7], [0.6, 0.64]]  # the means' variance against their standard errors
    means = [0.81, 0.7, 0.62]
    noise = sum((a - b) ** 2 / 4 for a, b in s) / 3
    spread = sum((x - sum(means) / 3) ** 2 for x in means) / 3
    assert reliability(s) == pytest.approx(1 - noise / spread)
    (picked,) = [x for x in runs if x["arm"] == "plan" and x["task"] == "glue/sst2"]
    rec = plan["recommended"]
    for key in ("targets", "lr_ratio", "lr", "max_steps"):
        assert picked["settings"][key] == rec[key]
    assert task["pick"]["test"] == picked["score"]
    gb = task["grid_best_seed"]
    seed0 = {(x["arm"], x["settings"]["lr"]): x for x in runs if x["seed"] == 0 and x["task"] == "glue/sst2"
             and x["arm"] in names}
    assert gb["value"] == seed0[gb["candidate"], gb["lr"]]["score"]
    assert task["pick_gap"] == pytest.approx(picked["score"] - gb["value"])
    assert task["compute_ratio"] == pytest.approx(sum(x["seconds"] for x in seed0.values())
                                                  / (task["plan_seconds"] + picked["seconds"]))
    (check,) = record["budget_checks"]
    assert check["task"] == "glue/sst2" and check["budget"]["found"] == "configured"
    assert [c["model"] for c in record["cost"]] == [tiny_bert_dir, tiny_llama_dir]
    for cost in record["cost"]:
        assert cost["n"] == 16 and cost["kernel_seconds"] > 0 and cost["lora_epoch_seconds"] > 0
        assert cost["examples"] == 16 + 16 and "q" in cost["kinds"] and "down" in cost["kinds"]
    assert (out / "PLAN.md").exists() and (out / "PLAN_cost.png").exists() and (out / "PLAN_glue-sst2.png").exists()
    r = run_cli("bench", "plan", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(tmp_path / "cs"),
                "--tasks", "commonsense/boolq")
    assert r.returncode == 2 and "--label-words" in r.stderr.strip().splitlines()[-1]
    r = run_cli("bench", "plan", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(tmp_path / "cs"),
                "--kinds", "q,v", "--grid-kinds", "v;q,v")
    assert r.returncode == 2 and "--grid-kinds" in r.stderr.strip().splitlines()[-1]
    r = run_cli("bench", "plan", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(tmp_path / "sft"),
                "--check-budget", "sft/alpaca_data_1k.json")
    assert r.returncode == 2 and "--check-budget" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "sft").exists()  # refused before anything is written


@needs_data
def test_bench_plan_on_a_language_models_loss(tmp_path, tiny_llama_dir):
    """bench plan on SFT (Alpaca chats on a tiny Llama, the claims suite's task id): judged by validation loss, the
    gate against the pretrained model's loss, attention only vs MLP only with a paired interval over validation examples."""
    from qkvtune.bench.plan_grid import LM_GATE

    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "suite.yaml").write_text(yaml.safe_dump({"seeds": [0], "lr_grid": {"lora": [1e-3]}}))
    out = tmp_path / "out"
    r = run_cli("bench", "plan", "--suite", str(suite), "--data-dir", data_dir(), "--out", str(out), "--n", "16",
                "--m", "8", "--kinds", "q,v;mlp", "--lambdas", "1", "--seeds", "0,1", "--tasks",
                "sft/alpaca_data_1k.json", f"sft.model={tiny_llama_dir}", "sft.max_train_samples=16",
                "sft.val_size=6", "sft.max_eval_samples=6", "sft.max_length=64", "sft.max_steps=4",
                "sft.eval_steps=2", "sft.batch_size=4", "sft.logging_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    (lm,) = json.load(open(out / "PLAN.json"))["tasks"]
    assert lm["metric"] == "loss" and lm["pretrained_loss"] > 0 and lm["points"] == 2
    assert lm["gate"][0] == (min(x["seeds"][0] for x in lm["rows"] if x["candidate"] == "q,v λ=1")
                             <= lm["pretrained_loss"] * (1 - LM_GATE))
    for x in lm["rows"]:  # a language model diverged where it ends worse than the pretrained model
        assert x["diverged"] == [v >= lm["pretrained_loss"] for v in x["seeds"]]
    groups = lm["groups_real"]
    assert set(groups) == {"best_group", "attention only", "MLP only"}
    best = groups["best_group"]
    assert groups[best]["minus_best"] == 0 and groups[best]["interval"] == [0.0, 0.0]
    other = next(g for g in ("attention only", "MLP only") if g != best)
    lo, hi = groups[other]["interval"]
    assert lo <= groups[other]["minus_best"] <= hi
    for g in ("attention only", "MLP only"):  # the re-measured per-example losses give the runs' own eval loss
        point = groups[g]["point"]
        rows = [x for x in lm["rows"] if f"{x['candidate']} lr={x['lr']:g}" == point]
        assert groups[g]["seeds"] == pytest.approx(rows[0]["seeds"], rel=1e-3)


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
                "--label-words", "false,true", "--kinds", "v;q,v", "--lambdas", "1,4", "--lrs", "1e-3",
                "--max-budget", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "plan.json"))
    assert summary["output"] == "margin" and summary["label_words"] == "false,true" and summary["heads"] == []
    assert summary["n_train"] == 24 and summary["n_val"] == 16 and len(summary["candidates"]) == 3
    assert summary["time_scale"]["moved"] > 0 and summary["time_scale"]["scale"] > 0
    trained = run_cli("train", str(out / "plan.yaml"), f"output_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"), "--label-words", "maybe,perhaps")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qkvtune: error: --label-words:")
    r = run_cli("plan", *common, "--out", str(tmp_path / "bad"))
    assert r.returncode == 2 and "--label-words" in r.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()


def test_token_margin_is_the_language_model_loss(tiny_llama_dir):
    """A causal LM's trained tokens as kernel points: drawn from every trained token pooled, each its example cut
    just after the token; softplus(−u) of ``token_margin`` is the model's cross-entropy of that token, with the
    logits computed only where it reads them (``KeepLogits``) or everywhere."""
    from transformers import AutoModelForCausalLM

    from qkvtune.analysis.ntk import KeepLogits, model_outputs, token_examples, token_margin
    from qkvtune.data import PadCollator
    from qkvtune.models import load_tokenizer

    tok = load_tokenizer(tiny_llama_dir)
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
                {"input_ids": [5, 11, 12], "labels": [-100, -100, 12]},
                {"input_ids": [5, 13], "labels": [-100, -100]}]  # nothing trained: no point
    points, groups = token_examples(examples, 10, seed=0)
    assert len(points) == 4 and groups == [0, 0, 0, 1]
    assert [p["input_ids"] for p in points] == [[5, 6, 7], [5, 6, 7, 8], [5, 6, 7, 8, 9], [5, 11, 12]]
    few, _ = token_examples(examples, 2, seed=3)
    assert len(few) == 2 and all(p in points for p in few)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    for collator in (PadCollator(tok), KeepLogits(PadCollator(tok))):
        batch = collator(points)
        with torch.no_grad():
            out = model(**{k: v for k, v in batch.items()})
        u = model_outputs(out, batch, token_margin)[:, 0]
        for i, p in enumerate(points):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([p["input_ids"]])).logits[0, -2]
            ce = torch.nn.functional.cross_entropy(logits[None], torch.tensor([p["input_ids"][-1]]))
            assert float(torch.nn.functional.softplus(-u[i])) == pytest.approx(float(ce), rel=1e-6)


def test_sft_predictor_equals_the_linearised_model(tiny_llama_dir):
    """The language model's loss predicted by the kernel (``empirical_ntk`` of ``token_margin`` on q and v, then
    ``train_linearised`` on the token loss softplus(−u)) equals the linearised model u = u₀ + J(θ − θ₀) trained by
    explicit gradient descent with a rate per kind, J the per-token gradients by autograd: the held-out tokens'
    loss after every step."""
    from transformers import AutoModelForCausalLM

    from qkvtune.analysis.kernel_sim import train_linearised
    from qkvtune.analysis.ntk import KeepLogits, empirical_ntk, token_examples, token_margin
    from qkvtune.data import PadCollator
    from qkvtune.models import load_tokenizer
    from qkvtune.targets import find_targets

    tok = load_tokenizer(tiny_llama_dir)
    g = torch.Generator().manual_seed(0)
    examples = [{"input_ids": (ids := torch.randint(5, 90, (9,), generator=g).tolist()),
                 "labels": [-100] * 3 + ids[3:]} for _ in range(4)]
    points, _ = token_examples(examples, 14, seed=1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).double().eval()
    targets = find_targets(model, ["q", "v"])
    res = empirical_ntk(model, points, targets, collator=KeepLogits(PadCollator(tok)), output=token_margin,
                        dtype=torch.float64)
    rates = {"q": 0.5, "v": 2.0}
    n = 10
    J = {k: [] for k in rates}
    for p in points:
        batch = {"input_ids": torch.tensor([p["input_ids"]]), "attention_mask": torch.ones(1, len(p["input_ids"]),
                                                                                           dtype=torch.long)}
        u = token_margin(model(**batch), batch)[0, 0]
        params = [t.projection(model).weight for t in targets]
        grads = torch.autograd.grad(u, params)
        for t, gr in zip(targets, grads):
            J[t.kind].append(gr.reshape(-1))
    # per point, the gradient with respect to every q (v) slice, concatenated over layers
    layers = len(targets) // 2
    grad = {k: torch.stack([torch.cat([J[k][p * layers + layer] for layer in range(layers)])
                            for p in range(len(points))]) for k in rates}
    assert torch.allclose(res.per_kind["q"], grad["q"] @ grad["q"].T, atol=1e-9)
    u0 = res.f0[:, 0]
    theta = {k: torch.zeros(grad[k].shape[1], dtype=torch.float64) for k in rates}
    losses = []
    for _ in range(6):
        u = u0 + sum(grad[k] @ theta[k] for k in rates)
        dl = torch.sigmoid(u[:n]) - 1.0  # ∂ softplus(−u)/∂u
        for k in rates:
            theta[k] = theta[k] - rates[k] * grad[k][:n].T @ dl / n
        u = u0 + sum(grad[k] @ theta[k] for k in rates)
        losses.append(float(torch.nn.functional.softplus(-u[n:]).mean()))
    kernel = sum(rates[k] * res.per_kind[k] for k in rates)
    traj = train_linearised(kernel, n, res.f0, None, "token", [1.0] * 6, range(1, 7))
    predicted = torch.nn.functional.softplus(-traj.val_outputs[:, :, 0]).mean(1)
    assert predicted.tolist() == pytest.approx(losses, rel=1e-9)


def test_a_budget_too_short_is_extended_to_where_the_kernel_learns():
    """No candidate reaches the goal within the configured steps: the horizon doubles until one does (×4 here, by
    construction between the ×2 and ×4 predictions), its rows at the new horizon; a goal no horizon up to the cap
    reaches is reported as such."""
    from qkvtune.plan.readout import Kinds, Readout
    from qkvtune.plan.simulate import Setting, extend_budget, simulate_grid

    g = torch.Generator().manual_seed(0)
    n, m = 24, 12
    feats = torch.randn(n + m, 6, generator=g, dtype=torch.float64) + 1.0  # a shared direction: tokens generalise
    kernel = feats @ feats.T / 6
    kinds = Kinds(["v"], kernel[None], torch.zeros(1, dtype=torch.float64), 1, {})
    f0 = torch.zeros(n + m, 1, dtype=torch.float64)
    readout = Readout([], [], "token_margin", "token", "loss", "tokens")
    base = math.log(2.0)  # softplus(0)
    st = Setting(kinds, n, f0, None, None, readout, 1.0, 0.0, 0.0, torch.full((n,), 0.25, dtype=torch.float64), base)
    cfg = build_config({"model": "x", "task": "text/x.txt", "max_steps": 10, "eval_strategy": "steps", "eval_steps": 5,
                        "warmup_ratio": 0.0, "scheduler": "constant", "output_dir": "unused"})
    cand = Candidate(("v",), 1.0)
    lr = 0.01
    at = {f: simulate_grid(st, cfg, [(cand, lr)], 10 * f, [10 * f])[0]["best_score"] for f in (1, 2, 4, 8)}
    assert at[1] > at[2] > at[4] > at[8]  # the loss keeps falling
    goal = (at[2] + at[4]) / 2
    rows = simulate_grid(st, cfg, [(cand, lr)], 10, [5, 10])
    found = extend_budget(st, cfg, [cand], rows, 10, goal, 16, log=lambda *_: None)
    assert found["found"] == "steps" and found["factor"] == 4 and found["max_steps"] == 40
    assert found["eval_steps"] == 20 and found["rows"][0]["best_score"] <= goal
    never = extend_budget(st, cfg, [cand], rows, 10, -1.0, 4, log=lambda *_: None)
    assert never["found"] == "none" and never["cap"] == 4


def test_examples_needed_from_a_power_law_learning_curve():
    """The examples a goal needs, from the kernel's learning curve in n: an error c·n^(−a) gives back a and the
    exact multiple of n; a curve still under the constant predictor but falling counts (MRPC at 60 steps: 0.70 →
    0.75 accuracy on a 0.73 constant); an error that does not fall with n names none."""
    from qkvtune.plan.simulate import examples_needed

    ns = [256, 512, 1024]
    acc = [(n, 1 - 0.5 * n ** -0.25) for n in ns]
    slope, multiple = examples_needed(acc, 1 - 0.5 * 4096 ** -0.25, "accuracy")
    assert slope == pytest.approx(0.25) and multiple == pytest.approx(4.0)
    loss = [(n, 2 * n ** -0.5) for n in ns]
    slope, multiple = examples_needed(loss, 2 * (9 * 1024) ** -0.5, "loss")
    assert slope == pytest.approx(0.5) and multiple == pytest.approx(9.0)
    assert examples_needed([(256, 0.703), (512, 0.711), (1024, 0.75)], 0.805, "accuracy")[1] > 1
    assert examples_needed([(256, 0.8), (512, 0.8), (1024, 0.79)], 0.9, "accuracy") is None


@needs_data
def test_plan_for_a_language_models_own_loss(tmp_path, tiny_llama_dir):
    """plan on causal-LM SFT (Alpaca records, loss on responses): trained tokens as the kernel's points, the
    predicted validation loss from the pretrained model's own (its f₀) down, attention vs MLP vs all-linear, and
    a plan.yaml that trains as it is."""
    out = tmp_path / "plan"
    common = [f"model={tiny_llama_dir}", "task=text/alpaca_data_1k.json", f"data_dir={data_dir()}",
              "max_train_samples=40", "max_eval_samples=16", "max_length=96", "max_steps=8", "eval_strategy=steps",
              "eval_steps=4", "batch_size=4", "lr=1e-3"]
    r = run_cli("plan", *common, "--out", str(out), "--n", "32", "--m", "16", "--tokens", "4",
                "--calibration-steps", "2", "--kinds", "q,v;mlp;all-linear", "--lambdas", "1", "--max-budget", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(out / "plan.json"))
    assert summary["metric"] == "loss" and summary["loss"] == "token" and summary["output"] == "token_margin"
    assert summary["n_train"] == 32 and summary["n_val"] == 16 and summary["heads"] == []
    assert set(summary["kinds"]) == {"q", "k", "v", "o", "gate", "up", "down"}
    for row in summary["candidates"]:
        assert row["val_score"] == pytest.approx(row["val_loss"])  # the metric is the loss itself
        assert row["unstable"] or row["best_score"] == min(row["val_score"])
    assert set(summary["groups"]) == {"attention only", "MLP only", "all-linear"}
    cfg = load_config(str(out / "plan.yaml"))
    assert cfg.targets == summary["recommended"]["targets"] and cfg.lr == summary["recommended"]["lr"]
    trained = run_cli("train", str(out / "plan.yaml"), f"output_dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]


def test_plan_keeps_the_simple_default_unless_a_candidate_beats_it_beyond_the_noise():
    """keep_default: all-linear λ = 1 is recommended unless the best stable candidate is predicted better by more
    than twice the noise of a validation score on m points (a proportion's √(p(1−p)/m))."""
    from qkvtune.plan.planner import keep_default, score_noise

    m = 400
    noise = score_noise("accuracy", 0.80, m)
    assert noise == pytest.approx((0.8 * 0.2 / 400) ** 0.5)

    def row(targets, lam, score, unstable=False):
        return {"name": ",".join(targets) + f" λ={lam:g}", "targets": targets, "lr_ratio": lam, "lr": 1e-3,
                "best_score": score, "unstable": unstable, "best_step": 10}

    default = row(["all-linear"], 1.0, 0.80)
    close = [row(["q", "v"], 2.0, 0.80 + 1.9 * noise), default]
    pick, why = keep_default(close, "accuracy", m)
    assert pick is default and why["default_kept"] and why["best_other"].startswith("q,v")
    far = [row(["q", "v"], 2.0, 0.80 + 2.1 * noise), default]
    pick, why = keep_default(far, "accuracy", m)
    assert pick is far[0] and not why["default_kept"] and why["margin"] == pytest.approx(2.1 * noise)
    # an unstable top is never the pick; a loss is better when lower
    pick, _ = keep_default([row(["v"], 1.0, 0.99, unstable=True), *far], "accuracy", m)
    assert pick is far[0]
    loss_default = row(["all-linear"], 1.0, 2.0)
    lower = row(["mlp"], 1.0, 2.0 - 3 * score_noise("loss", 2.0, m))
    assert keep_default([lower, loss_default], "loss", m)[0] is lower
    # no all-linear candidate: the plan's own ranking
    assert keep_default(far[:1], "accuracy", m)[0] is far[0]
