"""DPO on qkvtune's slices through TRL's DPOTrainer: preference records read and checked like every data file, the
same losses, rewards and adapter weights as TRL's DPOTrainer with a PEFT LoraConfig, step for step, and a run
that trains, evaluates against the pretrained model and exports in PEFT's layout."""

import dataclasses
import json
import os

import pytest
import torch

from conftest import lora_weights, run_cli, text_tokenizer, write_records
from qkvtune.config import ConfigError, build_config
from qkvtune.data import DataError, load_task

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")


def _pairs(path, n=24, chat=False, **edit):
    rows = []
    for i in range(n):
        r = {"prompt": f"question {i} asks", "chosen": f" yes, answer {i} is right", "rejected": f" no idea {i}"}
        if chat:
            r = {"prompt": [{"role": "user", "content": r["prompt"]}],
                 "chosen": [{"role": "assistant", "content": r["chosen"]}],
                 "rejected": [{"role": "assistant", "content": r["rejected"]}]}
        rows.append(r)
    return write_records(path, rows, **edit)


def test_preference_records_are_read_and_checked(tmp_path):
    tok = text_tokenizer()
    data = load_task("preference", tok, train_file=_pairs(tmp_path / "p.jsonl"), val_size=4)
    # 24 records: 2 (validation_fraction 0.1) the test split, 4 (val_size) the validation split, 18 trained on
    assert len(data.train) == 18 and len(data.evals["validation"]) == 4 and len(data.tests["test"]) == 2
    assert data.train.column_names == ["prompt", "chosen", "rejected"] and data.preference and data.causal_lm
    chats = load_task("preference", tok, train_file=_pairs(tmp_path / "c.jsonl", chat=True))
    assert chats.train[0]["prompt"][0]["role"] == "user"
    as_chat = load_task("preference", tok, train_file=_pairs(tmp_path / "a.jsonl"), as_chat=True)
    assert as_chat.train[0]["chosen"][0] == {"role": "assistant", "content": as_chat.train[0]["chosen"][0]["content"]}
    bad = {"r3": {"prompt": "q", "chosen": "a"}, "r5": {"prompt": "q", "chosen": "same", "rejected": "same"},
           "r7": {"prompt": " ", "chosen": "a", "rejected": "b"}}
    for key, row in bad.items():
        path = _pairs(tmp_path / f"bad{key}.jsonl", **{key: row})
        n = int(key[1:]) + 1
        with pytest.raises(DataError, match=rf"bad{key}.jsonl row {n}: "):
            load_task("preference", tok, train_file=path)
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "answer": "b"}) + "\n"
                                              for i in range(4)))
    with pytest.raises(DataError, match="need prompt, chosen and rejected; no 'rejected'"):
        load_task("preference", tok, train_file=str(tmp_path / "x.jsonl"))


def test_objective_keys_are_checked(tmp_path):
    path = _pairs(tmp_path / "p.jsonl")
    for settings, match in ((dict(task="builtin/vader", objective="dpo"), "objective: dpo trains on preference pairs"),
                            (dict(task="preference", train_file=path, dpo_beta=0), "dpo_beta: must be > 0"),
                            (dict(task="preference", train_file=path, method="smt"), "method: smt selects"),
                            (dict(task="preference", train_file=path, packing=True), "packing: "),
                            (dict(task="preference"), "task: preference needs train_file")):
        with pytest.raises(ConfigError, match=match):
            build_config({**settings, "output_dir": str(tmp_path / "o")})


def test_dpo_equals_trl_with_peft_step_for_step(tmp_path, tiny_llama_dir):
    """LoRA q, v (r 4, α 8) under DPO: qkvtune's run (its deltas, its optimizer groups, the reference precomputed
    with the deltas off) and TRL's DPOTrainer with a PEFT LoraConfig (the reference by disabling the adapter at
    every step), from the same initial A, on the same pairs, seed and settings: every logged loss, reward and
    margin, and the adapter weights after 6 AdamW steps, agree within 1e-5 (float32; the two compute the reference
    on differently padded batches, and TRL's loss runs through its fused LM head in both)."""
    from transformers import AutoModelForCausalLM

    from qkvtune import dpo, runs
    from qkvtune.trainer import training_arguments

    cfg = build_config(dict(model=tiny_llama_dir, task="preference", train_file=_pairs(tmp_path / "p.jsonl"),
                            targets=["q", "v"], rank=4, alpha=8, lr=5e-3, max_steps=6, batch_size=4, warmup_ratio=0.0,
                            eval_strategy="no", logging_steps=1, seed=3, dpo_beta=0.2, output_dir=str(tmp_path / "q")))
    run = runs.build(cfg)
    initial = {k: v.clone() for k, v in lora_weights(run.model).items()}
    args = dpo.dpo_arguments(cfg, training_arguments(cfg, run.task, "loss", False, has_eval=False))
    ours = dpo.build_trainer(run.model, run.tokenizer, args, run.task.train, None, run.adapter, rates=cfg)
    ours.train()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    theirs = trl.DPOTrainer(
        model=base, args=dataclasses.replace(args, output_dir=str(tmp_path / "t"), precompute_ref_log_probs=False),
        train_dataset=run.task.train, processing_class=run.tokenizer,
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    with torch.no_grad():  # the same starting point: PEFT's A := qkvtune's (both B = 0)
        for name, p in theirs.model.named_parameters():
            if ".lora_A." in name:
                p.copy_(initial[name.split("base_model.model.", 1)[1].split(".lora_")[0], "A"])
    theirs.train()

    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen")
    mine = [h for h in ours.state.log_history if "loss" in h and "train_runtime" not in h]
    other = [h for h in theirs.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(mine) == len(other) == 6
    for a, b in zip(mine, other):
        for k in keys:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    assert mine[-1]["rewards/margins"] > mine[0]["rewards/margins"]  # it learned something: the check is not vacuous
    w_ours, w_theirs = lora_weights(run.model), lora_weights(theirs.model)
    assert w_ours.keys() == w_theirs.keys() and len(w_ours) == 2 * 2 * 2
    for k in w_ours:
        torch.testing.assert_close(w_ours[k], w_theirs[k], atol=1e-5, rtol=1e-4, msg=str(k))
    assert all(not torch.equal(w_ours[k], initial[k]) for k in w_ours)  # every A and B moved


def test_a_dpo_run_trains_evaluates_and_exports_in_peft_layout(tmp_path, tiny_llama_dir):
    """qkvtune train on preference pairs: TRL's DPO metrics on the validation and test splits, each against the
    pretrained model (the run's deltas off); the adapter in PEFT's layout computes what the run computes; an
    evaluation of the finished run reads the same test metrics."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qkvtune.runs import open_run
    from qkvtune.train import evaluate_run, train

    out = tmp_path / "run"
    metrics = train(build_config(dict(model=tiny_llama_dir, task="preference", train_file=_pairs(tmp_path / "p.jsonl"),
                                      val_size=6, targets=["q", "v", "down"], lr=1e-2, max_steps=6, batch_size=4,
                                      eval_strategy="steps", eval_steps=3, output_dir=str(out))))
    assert {"eval_rewards/accuracies", "eval_rewards/margins", "test_rewards/accuracies", "test_loss"} <= set(metrics)
    assert metrics["test_rewards/margins"] > 0  # the chosen answers gained over the rejected ones
    again = evaluate_run(str(out))
    assert again["test_rewards/margins"] == pytest.approx(metrics["test_rewards/margins"], abs=1e-6)
    run = open_run(str(out), with_task=False)
    base = AutoModelForCausalLM.from_pretrained(run.cfg.model, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(out)).eval()
    ids = run.tokenizer(["question 3 asks yes"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pm(ids).logits, run.model.eval()(ids).logits, atol=1e-5, rtol=1e-4)
    r = run_cli("train", f"model={tiny_llama_dir}", "task=preference", f"train_file={tmp_path / 'p.jsonl'}",
                "dpo_loss_type=no_such_loss", "max_steps=1", f"output_dir={tmp_path / 'bad'}")
    assert r.returncode == 2 and "dpo_loss_type" in r.stderr and not os.path.exists(tmp_path / "bad")
