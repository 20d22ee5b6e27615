"""A loaded task's examples: ``TaskData`` (its kind and labels, tokenized splits, collator and metrics), the
padding collator every task uses, and the tokenization of one text or a text pair that every labelled family
uses."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Callable

import datasets
import torch

from ..errors import DataError
from ..task import TaskInfo


@dataclass(kw_only=True)
class TaskData(TaskInfo):
    """A loaded task: its kind and labels (``TaskInfo``) with its tokenized splits, collator and metrics."""

    name: str  # normalized task id, e.g. "glue/sst2"
    train: datasets.Dataset  # tokenized; only the columns the model takes
    evals: dict[str, datasets.Dataset]     # what selection reads: evaluation during training, best checkpoint
    collator: Callable
    compute_metrics: Callable | None  # keys without the "eval_" prefix
    metric_for_best: str
    greater_is_better: bool
    generation_records: dict[str, list[dict]] | None = None  # qa_generation: {"test": [{"prompt", "answer"}]}
    answer_choices: list[str] | None = None  # qa_generation: distinct answer labels
    info: dict = field(default_factory=dict)  # counts worth reporting with the metrics (sft: num_truncated)
    tests: dict[str, datasets.Dataset] = field(default_factory=dict)  # val_size: the task's own dev/test set,
                                                                       # scored once at the end, never selected on


class PadCollator:
    """Pads each batch to its own longest sequence (dynamic padding).

    Sequence labels (causal LM) pad with -100 so the loss ignores them; scalar labels become a
    long tensor (classes) or a float tensor (regression). The pad id and side are read from the
    tokenizer at call time, so a caller may still change them after `load_task`.
    """

    pad_values = {"labels": -100, "attention_mask": 0, "token_type_ids": 0}

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise DataError(no_pad_message(self.tokenizer))
        left = self.tokenizer.padding_side == "left"
        batch = {}
        for key in features[0]:
            values = [f[key].tolist() if hasattr(f[key], "tolist") else f[key] for f in features]
            if not isinstance(values[0], (list, tuple)):  # scalar label
                dtype = torch.float32 if any(isinstance(v, float) for v in values) else torch.long
                batch[key] = torch.tensor(values, dtype=dtype)
                continue
            width = max(len(v) for v in values)
            fill = self.pad_values.get(key, pad_id if key == "input_ids" else 0)
            rows = [[fill] * (width - len(v)) + list(v) if left else list(v) + [fill] * (width - len(v))
                    for v in values]
            batch[key] = torch.tensor(rows, dtype=torch.long)
        return batch


def no_pad_message(tokenizer) -> str:
    return (f"tokenizer {type(tokenizer).__name__} has no pad token; set one before load_task, "
            "e.g. tokenizer.pad_token = tokenizer.eos_token")


def tokenize_texts(columns: dict[str, list], tokenizer, max_length: int, desc: str) -> datasets.Dataset:
    """Tokenize text_a (and text_b as the pair's second text) without padding; label -> labels."""
    keep = set(tokenizer.model_input_names)

    def encode(batch):
        texts = (batch["text_a"], batch["text_b"]) if "text_b" in batch else (batch["text_a"],)
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        out = {k: v for k, v in enc.items() if k in keep}
        out["labels"] = batch["label"]
        return out

    return map_in_memory(datasets.Dataset.from_dict(columns), encode, desc)


def map_in_memory(ds: datasets.Dataset, fn: Callable, desc: str) -> datasets.Dataset:
    """``ds.map(fn, batched=True)`` replacing every column, with progress. The dataset lives in memory, so
    nothing is cached on disk and the fingerprint names nothing: a fresh one is given, because letting
    ``datasets`` compute it dill-pickles ``fn`` with the tokenizer it closes over (0.2-0.4 s a call, most of
    a small task's load)."""
    return ds.map(fn, batched=True, remove_columns=ds.column_names, desc=desc, new_fingerprint=uuid.uuid4().hex)
