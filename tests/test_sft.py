"""task: sft — chat records through the tokenizer's chat template with the loss on assistant turns only,
prompt/completion and Alpaca records, truncation counted, and a clear refusal without a chat template."""

import json
import math

import pytest
import transformers

from conftest import minilm_folder
from qkvtune.config import build_config
from qkvtune.data import DataError, load_task
from qkvtune.data.causal import set_chat_template
from qkvtune.train import train

TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")
CHATS = [[{"role": "system", "content": "be brief"}, {"role": "user", "content": f"what is {a} plus {b}"},
          {"role": "assistant", "content": f"it is {a + b}"}, {"role": "user", "content": "and doubled"},
          {"role": "assistant", "content": f"then {2 * (a + b)}"}] for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)] * 3]


def _tok(template=True):
    tok = transformers.AutoTokenizer.from_pretrained(minilm_folder())
    tok.eos_token = tok.sep_token
    if template:
        tok.chat_template = TEMPLATE
    return tok


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_chat_loss_covers_assistant_turns_only(tmp_path):
    tok = _tok()
    f = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    task = load_task("sft", tok, max_length=128, train_file=f, validation_file=f)
    ex = task.evals["dev"][0]
    learned = tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100])
    assert learned == "it is 3 [SEP] then 6 [SEP]"  # both assistant turns with their end marker, nothing else
    assert task.kind == "causal_lm" and task.info["num_truncated"] == 0
    every = load_task("sft", tok, max_length=128, train_on_inputs=True, train_file=f, validation_file=f)
    assert every.evals["dev"][0]["labels"] == every.evals["dev"][0]["input_ids"]
    short = load_task("sft", tok, max_length=30, train_file=f, validation_file=f)
    assert short.info["num_truncated"] == 2 * len(CHATS)  # every record of both splits is longer than 30 tokens
    assert all(len(x) == 30 for x in short.train[:]["input_ids"])


def test_prompt_completion_and_alpaca_records(tmp_path):
    tok = _tok(template=False)
    pc = _write(tmp_path / "pc.jsonl", [{"prompt": f"say {i}", "completion": f"number {i}"} for i in range(10)])
    task = load_task("sft", tok, max_length=64, seed=0, train_file=pc)
    assert len(task.train) == 9 and len(task.evals["dev"]) == 1  # a seeded tenth held out
    ex = task.train[0]
    assert tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100]).startswith("number")
    al = _write(tmp_path / "al.jsonl", [{"instruction": "add", "input": f"{i} 1", "output": f"{i + 1}"} for i in range(10)])
    task = load_task("sft", tok, max_length=128, train_file=al)
    assert "### Response:" in tok.decode(task.train[0]["input_ids"]) or "response" in tok.decode(task.train[0]["input_ids"])


def test_refusals_name_the_fix(tmp_path):
    f = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    with pytest.raises(DataError, match="chat_template: <file.jinja>"):
        load_task("sft", _tok(template=False), train_file=f, validation_file=f)
    bad = _write(tmp_path / "bad.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 3)
    with pytest.raises(DataError, match=r"bad.jsonl row 1: no assistant message"):
        load_task("sft", _tok(), train_file=bad, validation_file=bad)
    other = _write(tmp_path / "other.jsonl", [{"question": "q", "answer": "a"}] * 3)
    with pytest.raises(DataError, match="need messages, prompt \\+ completion, or instruction \\+ output"):
        load_task("sft", _tok(), train_file=other)


def test_sft_run_with_a_template_file(tmp_path, tiny_llama_dir):
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    f = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    metrics = train(build_config(dict(model=tiny_llama_dir, task="sft", train_file=f, chat_template=str(template),
                                      max_steps=4, batch_size=4, eval_strategy="no", lr=1e-2, max_length=64,
                                      output_dir=str(tmp_path / "run"))))
    assert metrics["eval_perplexity"] > 1 and metrics["num_truncated"] == 0
    tok = _tok(template=False)
    set_chat_template(tok, str(template))
    assert tok.chat_template == TEMPLATE


def test_alpaca_as_chat_three_splits_and_per_example_test_loss(tmp_path, tiny_llama_dir):
    """as_chat: Alpaca records through the tokenizer's chat template (user: instruction and input, assistant: the
    output, the loss on the latter); val_size carves the validation split out of the training records and the
    validation file becomes the test split, scored per example: each example's summed loss and token count, whose
    token-weighted mean is test_loss — checked against the model's own loss on each example alone."""
    import torch

    from qkvtune import runs

    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    records = [{"instruction": "add one", "input": f"{i}", "output": f"it is {i + 1}"} for i in range(24)]
    train_f, test_f = _write(tmp_path / "al.jsonl", records[:20]), _write(tmp_path / "al_test.jsonl", records[20:])
    tok = _tok()
    task = load_task("sft", tok, max_length=64, train_file=train_f, validation_file=test_f, val_size=5, seed=1,
                     as_chat=True)
    assert (len(task.train), len(task.evals["validation"]), len(task.tests["test"])) == (15, 5, 4)
    ex = task.tests["test"][0]
    assert tok.decode(ex["input_ids"]) == "< user > add one 20 [SEP] < assistant > it is 21 [SEP]"
    assert tok.decode([t for t, y in zip(ex["input_ids"], ex["labels"]) if y != -100]) == "it is 21 [SEP]"
    # without a validation file the held-out tenth is the test split, the same for every seed (paired runs)
    tests = [load_task("sft", tok, max_length=64, train_file=train_f, val_size=3, seed=s, as_chat=True).tests["test"]
             for s in (1, 2)]
    assert tests[0]["input_ids"] == tests[1]["input_ids"] and len(tests[0]) == 2
    with pytest.raises(Exception, match="as_chat"):
        load_task("glue/sst2", tok, as_chat=True)
    out = tmp_path / "run"
    metrics = train(build_config(dict(model=tiny_llama_dir, task="sft", train_file=train_f, validation_file=test_f,
                                      val_size=5, as_chat=True, chat_template=str(template), max_steps=3,
                                      batch_size=4, eval_strategy="no", lr=1e-2, max_length=64, output_dir=str(out))))
    pred = json.load(open(out / "test_predictions.json"))["test"]
    run = runs.open_run(str(out))
    own = []
    with torch.no_grad():
        run.model.eval()
        for e in run.examples("test"):
            batch = run.task.collator([e])
            n = int((batch["labels"][0, 1:] != -100).sum())
            own.append((n, float(run.model(**batch).loss) * n))  # the model's mean over its tokens, times their count
    assert pred["labels"] == [n for n, _ in own]
    assert pred["predictions"] == pytest.approx([s for _, s in own], rel=1e-4)
    assert metrics["test_loss"] == pytest.approx(sum(s for _, s in own) / sum(n for n, _ in own), rel=1e-4)
    assert metrics["test_perplexity"] == pytest.approx(math.exp(metrics["test_loss"]))
