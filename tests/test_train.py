"""End to end through transformers.Trainer on tiny models and real data: files left behind, eval and
export agree with the trained adapter, resume reproduces an uninterrupted run, errors are one line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from conftest import REPO, data_dir, run_cli
from qkvtune import io
from qkvtune.config import build_config
from qkvtune.runs import open_run
from qkvtune.train import evaluate_run, train

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def _cfg(tmp_path, model, **kw):
    base = dict(model=model, task="glue/sst2", data_dir=data_dir(), max_train_samples=64, max_eval_samples=32,
                batch_size=8, epochs=1, logging_steps=2, output_dir=str(tmp_path / "run"), lr=5e-3, lr_ratio=4.0)
    base.update(kw)
    return build_config(base)


@needs_data
def test_train_eval_export(tmp_path, tiny_bert_dir):
    cfg = _cfg(tmp_path, tiny_bert_dir)
    metrics = train(cfg)
    out = tmp_path / "run"
    for f in ("qkvtune_adapter.safetensors", "adapter_model.safetensors", "adapter_config.json", "metrics.json",
              "config.yaml", "loss.png"):
        assert (out / f).exists(), f
    saved = json.load(open(out / "metrics.json"))
    assert 0 <= saved["eval_accuracy"] <= 1 and saved["global_step"] == 8
    # the recorded rates are the ones asked for
    rates = json.load(open(out / "qkvtune_adapter.json"))["settings"]["learning_rates"]
    assert rates["q.A"] == 5e-3 and rates["v.B"] == pytest.approx(2e-2) and rates["head"] == 5e-3
    again = evaluate_run(str(out))
    assert again["eval_accuracy"] == pytest.approx(metrics["eval_accuracy"])
    assert again["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    # merged export = unmerged adapter
    run = open_run(str(out))
    model, task = run.model, run.task
    batch = task.collator([task.evals["dev"][i] for i in range(8)])
    batch.pop("labels")
    with torch.no_grad():
        y = model.eval()(**batch).logits
    r = subprocess.run([sys.executable, "-m", "qkvtune", "export", str(out), str(tmp_path / "merged")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert (merged(**batch).logits - y).abs().max() <= 1e-5
    if task.label_names:  # a merged classifier names its labels
        assert [merged.config.id2label[i] for i in range(len(task.label_names))] == list(task.label_names)


def test_gpt2_fused_qv_training_keeps_k_bit_identical(tmp_path, tiny_gpt2_dir):
    cfg = build_config(dict(model=tiny_gpt2_dir, task="builtin/pydoc", max_train_samples=16, max_eval_samples=4,
                            max_length=32, batch_size=4, max_steps=4, targets=["q", "v"], lr=1e-2,
                            output_dir=str(tmp_path / "run"), eval_strategy="no"))
    train(cfg)
    subprocess.run([sys.executable, "-m", "qkvtune", "export", str(tmp_path / "run"), str(tmp_path / "m")], check=True,
                   capture_output=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    for hb, ht in zip(base.transformer.h, tuned.transformer.h):
        w0, w1 = hb.attn.c_attn.weight, ht.attn.c_attn.weight
        assert torch.equal(w0[:, 32:64], w1[:, 32:64])
        assert not torch.equal(w0[:, :32], w1[:, :32]) and not torch.equal(w0[:, 64:], w1[:, 64:])
        assert torch.equal(hb.attn.c_proj.weight, ht.attn.c_proj.weight)


@needs_data
def test_resume_matches_uninterrupted_run(tmp_path, tiny_bert_dir):
    common = dict(max_steps=6, eval_strategy="steps", eval_steps=3, save_total_limit=5, dropout=0.1)
    full = _cfg(tmp_path, tiny_bert_dir, output_dir=str(tmp_path / "full"), **common)
    train(full)
    # a run stopped after its first checkpoint, then resumed
    part = _cfg(tmp_path, tiny_bert_dir, output_dir=str(tmp_path / "part"), **common)
    train(part)
    for name in os.listdir(tmp_path / "part"):
        if name.startswith("checkpoint-6") or not name.startswith("checkpoint"):
            p = tmp_path / "part" / name
            subprocess.run(["rm", "-rf", str(p)], check=True)
    train(_cfg(tmp_path, tiny_bert_dir, output_dir=str(tmp_path / "part"), resume=True, **common))
    a = load_file(tmp_path / "full" / "checkpoint-6" / io.QKV_WEIGHTS)
    b = load_file(tmp_path / "part" / "checkpoint-6" / io.QKV_WEIGHTS)
    assert a.keys() == b.keys()
    for k in a:  # resumed against uninterrupted: the same path, bit for bit
        assert torch.equal(a[k], b[k]), k


_cli = run_cli  # in process; the test below runs the real entry point


def test_cli_bad_config_is_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "never"
    r = subprocess.run([sys.executable, "-m", "qkvtune", "train", f"output_dir={out}", "lr_ration=4"],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["qkvtune: error: unknown config key 'lr_ration' (did you mean 'lr_ratio'?)"]
    assert not out.exists()


def test_cli_bad_data_names_file_and_row(tmp_path, tiny_bert_dir):
    folder = tmp_path / "data" / "glue" / "SST-2"
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\tmaybe\n")
    (folder / "dev.tsv").write_text("sentence\tlabel\nfine\t1\n")
    out = tmp_path / "never"
    r = _cli("train", f"model={tiny_bert_dir}", "task=glue/sst2", f"data_dir={tmp_path / 'data'}", f"output_dir={out}")
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("qkvtune: error:") and "train.tsv" in last and "row 3" in last
    assert "Traceback" not in r.stderr and not out.exists()


def test_cli_unknown_target_for_model(tmp_path, tiny_bert_dir):
    r = _cli("train", f"model={tiny_bert_dir}", "targets=[q]", "target_modules={nothing: q}",
             f"output_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "no Linear/Conv1D module ends with 'nothing'" in r.stderr


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_unseen_glue_layout_mnli_metric_names(tmp_path, tiny_bert_dir):
    """A GLUE task not in shared/datasets, from its folder: two dev sets, GLUE metric names, best model by
    the matched accuracy."""
    header = "index\tpromptID\tpairID\tgenre\ts1bp\ts2bp\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
    rows = [("a cat sleeps", "an animal rests", "entailment"), ("a cat sleeps", "a dog barks", "neutral"),
            ("it is raining", "it is dry", "contradiction")] * 6

    def tsv(n):
        return header + "".join(f"{i}\t0\t0\tg\tx\tx\tx\tx\t{a}\t{b}\t{c}\t{c}\n" for i, (a, b, c) in enumerate(rows[:n]))
    root = tmp_path / "data" / "glue" / "MNLI"
    _write(root / "train.tsv", tsv(18))
    _write(root / "dev_matched.tsv", tsv(6))
    _write(root / "dev_mismatched.tsv", tsv(3))
    cfg = build_config(dict(model=tiny_bert_dir, task="glue/mnli", data_dir=str(tmp_path / "data"), batch_size=6,
                            epochs=2, output_dir=str(tmp_path / "run"), patience=5))
    metrics = train(cfg)
    assert {"eval_matched_accuracy", "eval_mismatched_accuracy"} <= set(metrics)
    state = json.load(open(sorted((tmp_path / "run").glob("checkpoint-*"))[-1] / "trainer_state.json"))
    assert state["best_metric"] is not None and state["best_global_step"] in (3, 6)


def test_commonsense_generation_accuracy_end_to_end(tmp_path, tiny_llama_dir):
    recs = [{"instruction": f"Is {w} a fruit? Answer format: true/false", "input": "", "output":
             f"the correct answer is {a}", "answer": a} for w, a in [("apple", "true"), ("stone", "false")] * 4]
    _write(tmp_path / "data" / "commonsense" / "toy" / "train.json", json.dumps(recs))
    _write(tmp_path / "data" / "commonsense" / "toy" / "test.json", json.dumps(recs[:4]))
    cfg = build_config(dict(model=tiny_llama_dir, task="commonsense/toy", data_dir=str(tmp_path / "data"),
                            batch_size=4, max_steps=3, max_length=64, max_new_tokens=4, eval_strategy="no",
                            output_dir=str(tmp_path / "run")))
    metrics = train(cfg)
    assert metrics["eval_samples"] == 4 and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert "eval_loss" in metrics and not any("logits" in k for k in metrics)


def test_smt_end_to_end_reload_and_resume(tmp_path, tiny_bert_dir):
    """method=smt: warm-up + selection + block training through Trainer; the saved sparse adapter reloads
    to identical outputs; a resumed run reuses the checkpoint's selection and ends bit-identical."""
    common = dict(model=tiny_bert_dir, task="builtin/vader", max_train_samples=64, max_eval_samples=16,
                  batch_size=8, method="smt", block_size=8, smt_budget=6, smt_warmup_steps=2, lr=1e-2,
                  eval_strategy="steps", eval_steps=2, save_total_limit=4)
    full = train(build_config(dict(common, max_steps=4, output_dir=str(tmp_path / "full"))))
    out = tmp_path / "full"
    report = json.load(open(out / "smt_allocation.json"))
    assert sum(report["by_kind"].values()) == 6 and (out / "smt_allocation.png").exists()
    meta = json.load(open(out / io.QKV_CONFIG))
    assert meta["method"] == "smt" and len(meta["hparams"]["blocks"]) == 6
    assert full["trainable_parameters"] == 6 * 8 * 8 + 32 * 2 + 2  # blocks + classifier head
    again = evaluate_run(str(out))
    assert again["eval_loss"] == pytest.approx(full["eval_loss"], rel=1e-6)
    # resume from step 2 of a second run: same selection, same final adapter
    part = tmp_path / "part"
    train(build_config(dict(common, max_steps=4, output_dir=str(part))))
    for name in os.listdir(part):
        if name != "checkpoint-2":
            subprocess.run(["rm", "-rf", str(part / name)], check=True)
    train(build_config(dict(common, max_steps=4, output_dir=str(part), resume=True)))
    assert not (part / "smt_allocation.json").exists()  # no second warm-up
    a, b = load_file(out / io.QKV_WEIGHTS), load_file(part / io.QKV_WEIGHTS)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resumed: the same path


def test_cli_block_size_larger_than_matrix(tmp_path, tiny_bert_dir):
    r = _cli("train", f"model={tiny_bert_dir}", "method=smt", "block_size=64", f"output_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "block_size: 64 is larger than the smallest eligible matrix side (32)" in r.stderr
    assert not (tmp_path / "x").exists()


def test_cli_missing_model_and_corrupt_adapter(tmp_path, tiny_bert_dir):
    r = _cli("train", "model=/nonexistent/model-folder", f"output_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("qkvtune: error: model:")
    assert not (tmp_path / "x").exists()
    run = tmp_path / "run"
    train(build_config(dict(model=tiny_bert_dir, task="builtin/vader", max_train_samples=16, max_eval_samples=8,
                            max_steps=1, eval_strategy="no", output_dir=str(run))))
    (run / io.QKV_WEIGHTS).write_bytes(b"garbage")
    r = _cli("eval", str(run))
    assert r.returncode == 2 and "checksum" in r.stderr and "Traceback" not in r.stderr
    r = _cli("export", str(run), str(tmp_path / "merged"))
    assert r.returncode == 2 and not (tmp_path / "merged").exists()


def test_ntk_early_stopping_callback_records_prediction(tmp_path, tiny_bert_dir):
    cfg = build_config(dict(model=tiny_bert_dir, task="builtin/vader", max_train_samples=48, max_eval_samples=16,
                            batch_size=8, epochs=2, optim="sgd", lr=1e4, warmup_ratio=0, early_stopping="ntk",
                            on_nonfinite="skip", max_nonfinite_skips=12,
                            output_dir=str(tmp_path / "run")))
    metrics = train(cfg)
    record = json.load(open(tmp_path / "run" / "ntk_stopping.json"))
    predicted = record["ntk_predicted_step"]
    # the tiny random model's kernel is small (η̂ ≈ 2e4): only a large SGD step makes the rule fire in 12 steps
    assert isinstance(predicted, int) and 0 <= predicted < 12
    # the run stops at the prediction (Trainer's first step at the earliest), and the observed best is recorded
    assert metrics["global_step"] == record["ntk_stopped_at"] == max(predicted, 1)
    assert "ntk_observed_best_step" in record


def test_cli_analyze_is_wired():
    r = _cli("analyze", "--help")
    assert r.returncode == 0 and "ntk" in r.stdout and "task-vectors" in r.stdout


def _stops_at(callback, evaluations):
    """The 1-based evaluation at which ``callback`` asks Trainer to stop (None: never)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args, state = TrainingArguments(output_dir="unused", report_to=[]), TrainerState()
    for i, metrics in enumerate(evaluations, 1):
        control = TrainerControl()
        callback.on_evaluate(args, state, control, metrics=metrics)
        if control.should_training_stop:
            return i
    return None


def test_patience_counts_a_falling_loss_as_progress():
    """A flat accuracy (the majority-class plateau) with a falling loss is progress; patience runs out only
    after ``patience`` evaluations with neither better; the loss alone (metric = loss) and a lower-is-better
    metric follow the same count; other evaluations (test splits) are not counted."""
    from qkvtune.callbacks import PatienceCallback

    plateau = [{"eval_accuracy": 0.7, "eval_loss": 0.6 - 0.01 * i} for i in range(10)]
    assert _stops_at(PatienceCallback(2, "accuracy"), plateau) is None
    rising = plateau[:3] + [{"eval_accuracy": 0.7, "eval_loss": 0.9}] * 5
    assert _stops_at(PatienceCallback(2, "accuracy"), rising) == 5
    better_acc = rising[:4] + [{"eval_accuracy": 0.8, "eval_loss": 0.9}] + rising[4:]
    assert _stops_at(PatienceCallback(2, "accuracy"), better_acc) == 7
    loss_only = [{"eval_loss": v} for v in (0.5, 0.4, 0.45, 0.41, 0.39, 0.5, 0.5, 0.5)]
    assert _stops_at(PatienceCallback(3, "loss"), loss_only) == 8
    lower = [{"eval_rmse": v, "eval_loss": 1.0} for v in (3.0, 2.0, 2.5, 2.1)]
    assert _stops_at(PatienceCallback(2, "rmse", greater_is_better=False), lower) == 4
    with_tests = [plateau[0], {"test_accuracy": 0.5}, {"eval_accuracy": 0.6, "eval_loss": 0.9}, {"test_accuracy": 0.5},
                  {"eval_accuracy": 0.6, "eval_loss": 0.9}]
    assert _stops_at(PatienceCallback(2, "accuracy"), with_tests) == 5
