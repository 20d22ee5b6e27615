"""GRPO on qkvtune's slices through TRL's GRPOTrainer: rewards as closed forms (the final answer, a format, your own
function), prompt records read and checked like every data file, the same losses and rewards as TRL's GRPOTrainer
with a PEFT LoraConfig from the same start and seed, and a run that trains, scores greedy answers and saves."""

import dataclasses
import json

import pytest
import torch

from conftest import lora_weights, run_cli, text_tokenizer, write_records
from qkvtune.config import ConfigError, build_config
from qkvtune.data import DataError, load_task
from qkvtune.rewards import answer_reward, final_answer, reward_function

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")


def test_rewards_are_their_closed_forms(tmp_path, monkeypatch):
    assert final_answer("so 3 + 4 = 7, and then 12", "12") == "12" and final_answer("none", "3") is None
    assert final_answer("answer1 or maybe Answer3", "answer2") == "answer3"
    assert final_answer("It is TRUE, not false.", "true") == "false"  # the last label named
    assert answer_reward(None, ["= 12", "12.0", "1,200", "no"], ["12", "12", "1200", "12"]) == [1.0, 1.0, 1.0, 0.0]
    assert answer_reward(None, [[{"role": "assistant", "content": "the answer is answer2"}]], ["answer2"]) == [1.0]
    fmt = reward_function("regex:^Answer: ")
    assert fmt(None, ["Answer: 4", "4", " Answer: 4"]) == [1.0, 0.0, 0.0]
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions, **kw):\n"
                                            "    return [1.0 if len(c) < 5 else 0.0 for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reward_function("my_rewards:short")(None, ["ok", "far too long"]) == [1.0, 0.0]
    for spec, match in (("my_rewards:nope", "has no 'nope'"), ("no_such_module:f", "cannot import"),
                        ("regex:(", "not a regular expression"), ("", "expected answer")):
        with pytest.raises(ConfigError, match=f"reward: .*{match}"):
            reward_function(spec)


def _prompts(path, n=16, **edit):
    return write_records(path, [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(n)], **edit)


def test_prompt_records_are_read_and_checked(tmp_path):
    tok = text_tokenizer()
    data = load_task("prompts", tok, train_file=_prompts(tmp_path / "p.jsonl", n=20), val_size=4)
    assert data.rewarded and data.train.column_names == ["prompt", "answer"] and len(data.evals["validation"]) == 4
    chats = load_task("prompts", tok, train_file=_prompts(tmp_path / "c.jsonl"), as_chat=True)
    assert chats.train[0]["prompt"] == [{"role": "user", "content": chats.train[0]["prompt"][0]["content"]}]
    with pytest.raises(DataError, match=r"e.jsonl row 3: empty prompt"):
        load_task("prompts", tok, train_file=_prompts(tmp_path / "e.jsonl", r2={"prompt": " ", "answer": "1"}))
    with pytest.raises(DataError, match=r"a.jsonl row 5: no answer for the reward"):
        load_task("prompts", tok, train_file=_prompts(tmp_path / "a.jsonl", r4={"prompt": "q", "answer": ""}))
    (tmp_path / "f.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(8)))
    with pytest.raises(DataError, match="reward answer checks each record's 'answer'"):
        load_task("prompts", tok, train_file=str(tmp_path / "f.jsonl"))
    assert len(load_task("prompts", tok, train_file=str(tmp_path / "f.jsonl"), reward="regex:x").train) == 7
    for settings, match in ((dict(batch_size=6, grpo_generations=4), "batch_size: counts completions"),
                            (dict(objective="dpo"), "objective: dpo trains on preference pairs"),
                            (dict(method="smt"), "method: smt selects"), (dict(reward="nope"), "reward: "),
                            (dict(reward=[]), "reward: names no reward"), (dict(grpo_beta=-1.0), "grpo_beta: ")):
        with pytest.raises(ConfigError, match=match):
            build_config({"task": "prompts", "train_file": str(tmp_path / "p.jsonl"), "output_dir": "x", **settings})


@pytest.mark.parametrize("beta", [0.0, 0.2])
def test_grpo_equals_trl_with_peft_on_the_same_samples(tmp_path, tiny_llama_dir, beta):
    """LoRA q, v under GRPO: qkvtune's run and TRL's GRPOTrainer with a PEFT LoraConfig, from the same initial A
    and seed, sample the same completions (both models compute the base exactly while B = 0, and the same tiny
    float differences after), so every logged loss, reward and completion length — and with a KL term, the KL to
    the reference (ours: the deltas off; PEFT's: the adapter disabled) — and the adapter weights after 3 steps
    agree within 1e-5."""
    from transformers import AutoModelForCausalLM

    from qkvtune import grpo, runs
    from qkvtune.trainer import training_arguments

    cfg = build_config(dict(model=tiny_llama_dir, task="prompts", train_file=_prompts(tmp_path / "p.jsonl"),
                            reward=["answer", "regex:\\d"], targets=["q", "v"], rank=4, alpha=8, lr=5e-2,
                            max_steps=3, batch_size=4, grpo_generations=2, grpo_completion_length=6,
                            warmup_ratio=0.0, eval_strategy="no", logging_steps=1, seed=5, grpo_beta=beta,
                            output_dir=str(tmp_path / "q")))
    run = runs.build(cfg)
    initial = {k: v.clone() for k, v in lora_weights(run.model).items()}
    args = grpo.grpo_arguments(cfg, training_arguments(cfg, run.task, "loss", False, has_eval=False))
    ours = grpo.build_trainer(run.model, run.tokenizer, args, run.task.train, None, cfg.reward, run.adapter,
                              rates=cfg)
    ours.train()

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    theirs = trl.GRPOTrainer(model=base, reward_funcs=[reward_function("answer"), reward_function("regex:\\d")],
                             args=grpo.grpo_arguments(cfg, training_arguments(
                                 dataclasses.replace(cfg, output_dir=str(tmp_path / "t")), run.task, "loss", False,
                                 has_eval=False)),
                             train_dataset=run.task.train, processing_class=run.tokenizer,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                         lora_dropout=0.0))
    with torch.no_grad():
        for name, p in theirs.model.named_parameters():
            if ".lora_A." in name:
                p.copy_(initial[name.split("base_model.model.", 1)[1].split(".lora_")[0], "A"])
    theirs.train()
    mine = [h for h in ours.state.log_history if "loss" in h and "train_runtime" not in h]
    other = [h for h in theirs.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(mine) == len(other) == 3
    for a, b in zip(mine, other):
        for k in ("loss", "reward", "reward_std", "completions/mean_length") + (("kl",) if beta else ()):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (a["step"], k)
    w_ours, w_theirs = lora_weights(run.model), lora_weights(theirs.model)
    assert w_ours.keys() == w_theirs.keys()
    for k in w_ours:
        torch.testing.assert_close(w_ours[k], w_theirs[k], atol=1e-5, rtol=1e-4, msg=str(k))
    assert any(not torch.equal(w_ours[k], initial[k]) for k in w_ours if k[1] == "B")  # it trained
    if beta:
        assert mine[-1]["kl"] > 0  # it moved away from the reference, and the KL saw it


def test_a_grpo_run_trains_scores_greedy_answers_and_saves(tmp_path, tiny_llama_dir):
    from qkvtune.train import train

    out = tmp_path / "run"
    metrics = train(build_config(dict(model=tiny_llama_dir, task="prompts", train_file=_prompts(tmp_path / "p.jsonl"),
                                      val_size=4, reward=["answer", "regex:\\d"], lr=1e-2, max_steps=2,
                                      batch_size=4, grpo_generations=2, grpo_completion_length=6,
                                      grpo_beta=0.1, eval_strategy="no", logging_steps=1, output_dir=str(out))))
    for split in ("eval", "test"):
        assert 0 <= metrics[f"{split}_reward"] <= 2  # the two rewards summed, each in [0, 1]
        assert metrics[f"{split}_reward"] == pytest.approx(
            metrics[f"{split}_reward/answer_reward"] + metrics[f"{split}_reward/regex:\\d"])
    history = json.load(open(out / "checkpoint-2" / "trainer_state.json"))["log_history"]
    assert {"reward", "kl", "completions/mean_length"} <= set(history[0])  # progress: reward, KL, lengths
    assert (out / "adapter_model.safetensors").exists() and (out / "qkvtune_adapter.safetensors").exists()


def test_bad_prompt_or_reward_input_is_one_line_and_exit_2(tmp_path, tiny_llama_dir):
    bad = _prompts(tmp_path / "p.jsonl", r3={"prompt": "", "answer": "1"})
    good = _prompts(tmp_path / "ok.jsonl")
    for extra, message in (([f"train_file={bad}"], "p.jsonl row 4: empty prompt"),
                           ([f"train_file={good}", "reward=no_such_module:f"], "reward: cannot import 'no_such_module'")):
        out = tmp_path / "out"
        r = run_cli("train", f"model={tiny_llama_dir}", "task=prompts", *extra, f"output_dir={out}")
        errors = [line for line in r.stderr.splitlines() if "error" in line]
        assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr[-500:]
        assert not out.exists()  # nothing half-written
