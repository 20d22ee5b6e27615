"""Causal LM data: plain text cut into blocks, and Alpaca-style instruction records."""
import json
import logging
import os

import datasets

from ..errors import DataError
from ..task import CAUSAL_LM
from .examples import PadCollator, TaskData, map_in_memory
from .load import read_text
from .spec import subsample

log = logging.getLogger(__name__)

PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n"
                     "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt used by LLM-Adapters, ending just before the response."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT.format(instruction=instruction)


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS, [CLS]); [] if none."""
    full = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i]
    return []


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt ids exactly as they start a training sequence (prefix specials, no suffix ones),
    so generation sees the same context the model was trained on."""
    prefix = special_prefix(tokenizer)
    return [prefix + ids for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]


def encode_sft(tokenizer, prompts: list[str], responses: list[str], max_length: int,
               train_on_inputs: bool) -> dict[str, list]:
    """prompt + response + eos, truncated; labels -100 over the prompt unless train_on_inputs.

    Prompt and response are tokenized separately so the prompt/response boundary is exact.
    Sequences whose response is cut off entirely are dropped: an all -100 batch has a NaN loss.
    """
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    responses = tokenizer(responses, add_special_tokens=False)["input_ids"]
    for p, r in zip(encode_prompts(tokenizer, prompts), responses):
        ids = (p + r + eos)[:max_length]
        if len(ids) <= len(p) and not train_on_inputs:
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append(list(ids) if train_on_inputs else [-100] * len(p) + ids[len(p):])
    return out


def tokenize_sft(records: dict[str, list], tokenizer, max_length: int, train_on_inputs: bool,
                 desc: str, source: str | None = None) -> datasets.Dataset:
    """Columns prompt, response -> input_ids, attention_mask, labels."""
    ds = datasets.Dataset.from_dict({"prompt": records["prompt"], "response": records["response"]})
    out = map_in_memory(ds, lambda b: encode_sft(tokenizer, b["prompt"], b["response"], max_length, train_on_inputs),
                        desc)
    if len(out) == 0:
        raise DataError(f"{source or desc}: every record's prompt fills max_length={max_length}; raise max_length")
    if len(out) < len(ds):
        log.warning("%s: dropped %d of %d records whose prompt fills max_length=%d; raise max_length to keep them",
                    desc, len(ds) - len(out), len(ds), max_length)
    return out


def text_blocks(text: str, tokenizer, block: int, source: str) -> list[list[int]]:
    """The whole text as one token stream cut into full blocks (the remainder is dropped)."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # verbose: no too-long warning
    if len(ids) < 2 * block:
        raise DataError(f"{source}: {len(ids)} tokens, need at least 2 blocks of max_length={block}")
    return [ids[i:i + block] for i in range(0, len(ids) - block + 1, block)]


def n_dev(n: int) -> int:
    return max(1, n // 10)  # last 10%, at least 1


def blocks_task(name: str, blocks: list[list[int]], tokenizer, max_train_samples, max_eval_samples,
                seed) -> TaskData:
    """A causal LM task from token blocks: the last 10% of blocks are the dev set."""
    k = len(blocks) - n_dev(len(blocks))
    train = subsample({"input_ids": blocks[:k]}, max_train_samples, seed)["input_ids"]
    dev = subsample({"input_ids": blocks[k:]}, max_eval_samples, None)["input_ids"]
    as_ds = lambda b: datasets.Dataset.from_dict({"input_ids": b, "attention_mask": [[1] * len(x) for x in b],
                                                  "labels": b})
    return causal_task(name, as_ds(train), {"dev": as_ds(dev)}, tokenizer)


def causal_task(name, train, evals, tokenizer, kind=CAUSAL_LM) -> TaskData:
    """A causal LM task; checkpoints are selected on the validation loss (generated answers are scored once, at
    the end)."""
    return TaskData(name=name, kind=kind, num_labels=0, label_names=None, train=train, evals=evals,
                    collator=PadCollator(tokenizer), compute_metrics=None, metric_for_best="loss",
                    greater_is_better=False)


def read_json_records(path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """A JSON list (or JSON lines) of objects with string fields; errors name file and record/line."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if path.endswith(".jsonl"):
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_parse_json(line, path, f"line {n}"))
                where.append(f"line {n}")
    else:
        records = _parse_json(text, path, None)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        where = [f"record {i}" for i in range(len(records))]
    if not records:
        raise DataError(f"{path}: no records")
    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(f"{path} {at}: expected an object, got {type(rec).__name__}")
        for key in required + tuple(k for k in optional if k in rec):
            if key not in rec:
                raise DataError(f"{path} {at}: missing key {key!r}")
            if not isinstance(rec[key], str):
                raise DataError(f"{path} {at}: {key!r} must be a string, got {type(rec[key]).__name__}")
            try:
                rec[key].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape (\udc80): no text a tokenizer can take
                raise DataError(f"{path} {at}: {key!r} holds an invalid Unicode escape") from None
    return records


def _parse_json(text: str, path: str, at: str | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} {at or f'line {e.lineno}'}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path} {at or ''}: JSON nested too deeply".replace(" :", ":")) from None


def load_text(file: str, tokenizer, data_dir: str, *, max_length: int, max_train_samples, max_eval_samples,
              seed, train_on_inputs: bool) -> TaskData:
    path = os.path.join(data_dir, "text", file)
    name = f"text/{file}"
    if file.endswith(".txt"):
        blocks = text_blocks(read_text(path), tokenizer, max_length, path)
        return blocks_task(name, blocks, tokenizer, max_train_samples, max_eval_samples, seed)
    if not file.endswith((".json", ".jsonl")):
        raise DataError(f"{path}: unsupported file type (expected .txt, .json or .jsonl)")
    records = read_json_records(path, ("instruction", "output"), ("input",))
    if len(records) < 2:
        raise DataError(f"{path}: {len(records)} record, need at least 2 (train and dev)")
    columns = {"prompt": [alpaca_prompt(r["instruction"], r.get("input", "")) for r in records],
               "response": [r["output"] for r in records]}
    k = len(records) - n_dev(len(records))
    train = subsample({c: v[:k] for c, v in columns.items()}, max_train_samples, seed)
    dev = subsample({c: v[k:] for c, v in columns.items()}, max_eval_samples, None)
    return causal_task(name, tokenize_sft(train, tokenizer, max_length, train_on_inputs, f"{name} train", path),
                       {"dev": tokenize_sft(dev, tokenizer, max_length, train_on_inputs, f"{name} dev", path)},
                       tokenizer)
