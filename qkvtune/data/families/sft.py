"""``task: sft``: supervised fine-tuning of chat and instruction models on your own records, as TRL's
SFTTrainer reads them:

* ``messages`` (a list of ``{role, content}``) rendered with the tokenizer's own chat template
  (``apply_chat_template``; ``chat_template: <file>`` supplies or replaces it); the loss covers the assistant
  turns only, unless ``train_on_inputs``;
* ``prompt`` + ``completion`` strings: the loss covers the completion;
* Alpaca records (``instruction``, ``input``, ``output``), with the Alpaca prompt.

``as_chat: true`` renders prompt/completion and Alpaca records as a one-turn chat through the tokenizer's own
chat template instead (user: the prompt, or the instruction with its input below it; assistant: the answer), as
a chat model is used. Sources as for classification (``train_file``/``validation_file`` or ``dataset``; a seeded
``validation_fraction`` is held out otherwise); with ``val_size`` a seeded validation split is carved out of the
training records and the validation records become the test split (scored once, per example). Examples longer than ``max_length`` are truncated, counted
(``num_truncated``) and logged; one whose trained tokens are all cut off is dropped (its loss would be 0/0).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import datasets

from ...errors import DataError
from ...task import CAUSAL_LM
from ..causal import alpaca_prompt, causal_task, encode_sft
from ..examples import TaskData
from ..family import Family
from ..rows import split_train, subsample
from ..sources import first_json_record, local_dir, resolve_data_dir
from ..tables import Table, read_splits
from .tables import needs_rows

log = logging.getLogger(__name__)


def _rows(table: Table) -> tuple[str, list]:
    cols = table.columns
    if "messages" in cols:
        return "messages", cols["messages"]
    if "prompt" in cols and "completion" in cols:
        return "prompt", list(zip(cols["prompt"], cols["completion"]))
    if "instruction" in cols and "output" in cols:
        inputs = cols.get("input") or [""] * len(cols["instruction"])
        return "alpaca", list(zip(cols["instruction"], inputs, cols["output"]))
    raise DataError(f"{table.where[0][0]}: sft records need messages, prompt + completion, or instruction + output; "
                    f"the columns are {', '.join(cols)}")


def _check_messages(table: Table, convs: list) -> None:
    for i, conv in enumerate(convs):
        if not isinstance(conv, list) or not conv:
            raise DataError(f"{table.at(i)}: messages must be a non-empty list of {{role, content}}")
        for m in conv:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DataError(f"{table.at(i)}: each message needs a string role and content")
        if not any(m["role"] == "assistant" for m in conv):
            raise DataError(f"{table.at(i)}: no assistant message to learn")


def assistant_spans(tokenizer, conv: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: each turn's span runs from
    the end of the conversation so far rendered with a generation prompt to the end of the turn rendered."""
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    spans = []
    for i, m in enumerate(conv):
        if m["role"] != "assistant":
            continue
        start = tokenizer.apply_chat_template(conv[:i], tokenize=False, add_generation_prompt=True) if i else ""
        end = tokenizer.apply_chat_template(conv[:i + 1], tokenize=False)
        if not (text.startswith(end) and end.startswith(start)):
            raise DataError("chat template: rendering is not prefix-stable, so assistant turns cannot be located")
        spans.append((len(start), len(end)))
    return text, spans


def encode_chat(tokenizer, convs: list, max_length: int, train_on_inputs: bool) -> tuple[dict, int]:
    """input_ids/attention_mask/labels of chat conversations (labels only on assistant tokens unless
    ``train_on_inputs``), and how many were truncated."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    truncated = 0
    for conv in convs:
        text, spans = assistant_spans(tokenizer, conv)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        ids = enc["input_ids"]
        trained = [train_on_inputs or any(a <= s < b for a, b in spans) for s, _ in enc["offset_mapping"]]
        if len(ids) > max_length:
            truncated += 1
            ids, trained = ids[:max_length], trained[:max_length]
        if not any(trained):
            continue
        out["input_ids"].append(ids)
        out["attention_mask"].append([1] * len(ids))
        out["labels"].append([t if keep else -100 for t, keep in zip(ids, trained)])
    return out, truncated


def as_messages(form: str, rows: list) -> list:
    """prompt/completion or Alpaca rows as one-turn chats: [user: the prompt (the instruction, its input below it),
    assistant: the answer]."""
    if form == "prompt":
        pairs = [(r[0], r[1]) for r in rows]
    else:
        pairs = [(r[0] + ("\n\n" + r[1] if r[1] else ""), r[2]) for r in rows]
    return [[{"role": "user", "content": p}, {"role": "assistant", "content": c}] for p, c in pairs]


def _encode(tokenizer, form: str, rows: list, max_length: int, train_on_inputs: bool, desc: str,
            as_chat: bool = False):
    if as_chat and form != "messages":
        form, rows = "messages", as_messages(form, rows)
    if form == "messages":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("messages: the tokenizer has no chat template; give one with chat_template: <file.jinja>")
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("messages: locating assistant turns needs a fast tokenizer (offsets)")
        cols, truncated = encode_chat(tokenizer, rows, max_length, train_on_inputs)
    else:
        if form == "prompt":
            prompts, responses = [r[0] for r in rows], [r[1] for r in rows]
        else:  # alpaca: (instruction, input, output)
            prompts, responses = [alpaca_prompt(r[0], r[1] or "") for r in rows], [r[2] for r in rows]
        eos = 1 if tokenizer.eos_token_id is not None else 0
        lengths = [len(a) + len(b) + eos for a, b in zip(tokenizer(prompts, add_special_tokens=False)["input_ids"],
                                                       tokenizer(responses, add_special_tokens=False)["input_ids"])]
        truncated = sum(n > max_length for n in lengths)
        cols = encode_sft(tokenizer, prompts, responses, max_length, train_on_inputs)
    if truncated:
        log.warning("%s: %d of %d examples are longer than max_length=%d and were truncated", desc, truncated,
                    len(rows), max_length)
    if not cols["input_ids"]:
        raise DataError(f"{desc}: no example keeps a trained token within max_length={max_length}")
    return datasets.Dataset.from_dict(cols), truncated


def _check_rows(table: Table, form: str, rows: list) -> None:
    if form == "messages":
        _check_messages(table, rows)
        return
    for i, r in enumerate(rows):
        if not all(isinstance(v, str) for v in r if v is not None) or not r[0] or not r[-1]:
            raise DataError(f"{table.at(i)}: empty or non-text {('prompt/completion' if form == 'prompt' else 'instruction/output')}")


class Sft(Family):
    """``sft``: your own records (``train_file`` or ``dataset``); ``sft/<file>``: a file of records under
    ``<data_dir>/text/`` (what the benchmarks find there)."""
    name = "sft"
    usage = "sft, sft/<file>"
    discovers = "sft/<file under text/>"
    named = False
    kind = CAUSAL_LM
    metric = "loss"
    offers = frozenset({"val_size", "packing", "as_chat"})
    RECORDS = (("messages",), ("prompt", "completion"), ("instruction", "output"))  # what a file of records has

    def owns(self, task: str) -> bool:
        return task.partition("/")[0].lower() == self.name

    def check(self, spec) -> None:
        if "/" not in spec.task:
            needs_rows(spec)

    def load(self, spec, tokenizer, seed: int) -> TaskData:
        if "/" in spec.task and not spec.train_file and not spec.dataset:
            local_dir(spec.task, spec.data_dir)  # a file under <data_dir>/text/: a data folder is needed
            spec = dataclasses.replace(spec, train_file=self.run_settings(spec.task, spec.data_dir)["train_file"])
        train, dev, _ = read_splits(spec, seed)
        splits = {}
        for split, table in (("train", train), ("dev", dev)):
            form, rows = _rows(table)
            _check_rows(table, form, rows)
            splits[split] = (form, rows)
        form, rows = splits["train"]
        kept, held = split_train({"i": list(range(len(rows)))}, spec.max_train_samples, spec.val_size, seed)
        chosen = {"train": (form, [rows[i] for i in kept["i"]])}
        if held is not None:
            chosen["validation"] = (form, [rows[i] for i in held["i"]])
        form, rows = splits["dev"]
        chosen["dev"] = (form, [rows[i] for i in subsample({"i": list(range(len(rows)))}, spec.max_eval_samples,
                                                           None)["i"]])
        name = lambda t: os.path.basename(t.where[0][0].split(" [")[0])
        parts = {k: _encode(tokenizer, f, r, spec.max_length, spec.train_on_inputs,
                            f"sft {k} ({name(dev if k == 'dev' else train)})", spec.as_chat)
                 for k, (f, r) in chosen.items()}
        if held is None:
            task = causal_task("sft", parts["train"][0], {"dev": parts["dev"][0]}, tokenizer)
        else:  # three splits: validation (selection) out of the training records, the validation records as the test
            task = causal_task("sft", parts["train"][0], {"validation": parts["validation"][0]}, tokenizer)
            task.tests = {"test": parts["dev"][0]}
        task.info = {"num_truncated": sum(p[1] for p in parts.values())}
        return task

    def discover(self, data_dir: str) -> list[str]:
        """``sft/<file>``: the JSON/JSONL files under ``text/`` whose first record is an sft record."""
        text = os.path.join(data_dir, "text")
        if not os.path.isdir(text):
            return []
        return [f"sft/{entry}" for entry in sorted(os.listdir(text)) if entry.endswith((".json", ".jsonl"))
                and any(all(k in (first_json_record(os.path.join(text, entry)) or {}) for k in keys)
                        for keys in self.RECORDS)]

    def run_settings(self, task: str, data_dir: str | None) -> dict:
        """``sft/<file>`` is ``task: sft`` with that file under ``<data_dir>/text/`` as its ``train_file``."""
        name = task.partition("/")[2]
        folder = resolve_data_dir(data_dir)
        path = name if os.path.isabs(name) or folder is None else os.path.join(os.path.abspath(folder), "text", name)
        return {"task": "sft", "train_file": path}


FAMILIES = (Sft(),)
