"""Causal-LM examples, whatever family they come from: prompts and responses tokenized with the boundary exact
(the Alpaca prompt of LLM-Adapters for instruction records), plain text cut into blocks, and the ``TaskData`` of
a causal LM, selected on its validation loss."""

from __future__ import annotations

import logging

import datasets

from ..errors import DataError
from ..task import CAUSAL_LM
from .examples import PadCollator, TaskData, map_in_memory
from .rows import subsample
from .sources import read_text

log = logging.getLogger(__name__)


def set_chat_template(tokenizer, path: str | None) -> None:
    """``chat_template: <file>``: a Jinja template file for tokenizers that have none (or to replace theirs)."""
    if path:
        tokenizer.chat_template = read_text(path)

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
