"""Data layer: `load_task` turns a task id into tokenized train/eval sets, a padding collator
and Trainer metrics.

Task ids: classification and regression (your own CSV/TSV/JSON/JSONL/Parquet files or dataset, files.py),
glue/<task> (nine GLUE tasks), commonsense/<name> (LLM-Adapters JSON), text/<file> (.txt, .json, .jsonl)
and builtin/vader, builtin/pydoc (offline data).
"""
import os
import random
from dataclasses import dataclass, field
from typing import Callable

import datasets
import torch

from ..errors import QkvtuneError


class DataError(QkvtuneError):
    """Bad or missing data. The message names the file and the row (1-based line number),
    JSON record (0-based index) or field at fault."""


@dataclass
class TaskData:
    name: str  # normalized task id, e.g. "glue/sst2"
    kind: str  # "classification" | "regression" | "causal_lm" | "qa_generation"
    num_labels: int  # classes; 1 for regression; 0 for causal LM kinds
    label_names: list[str] | None
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


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole text of a data file, or a DataError naming it (missing, a folder, unreadable, not UTF-8)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found")
    if not os.path.isfile(path):
        raise DataError(f"{path}: is not a file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} row {line}: not UTF-8 text (byte {e.start})") from None


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The argument, else $QKVTUNE_DATA, else None (meaning: the Hugging Face hub)."""
    data_dir = data_dir or os.environ.get("QKVTUNE_DATA") or None
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data folder not found")
    return data_dir


def find_dir(parent: str, name: str) -> str:
    """`parent/name`, matching the folder name case-insensitively and ignoring '-' and '_'."""
    path = os.path.join(parent, name)
    if os.path.isdir(path):
        return path
    norm = lambda s: s.lower().replace("-", "").replace("_", "")
    if os.path.isdir(parent):
        for entry in sorted(os.listdir(parent)):
            if norm(entry) == norm(name) and os.path.isdir(os.path.join(parent, entry)):
                return os.path.join(parent, entry)
    raise DataError(f"{path}: folder not found")


def subsample(columns: dict[str, list], n: int | None, seed: int | None) -> dict[str, list]:
    """A seeded random subset of n rows (file order kept), or the first n rows when seed is None."""
    total = len(next(iter(columns.values())))
    if n is None or n >= total:
        return columns
    idx = list(range(n)) if seed is None else sorted(random.Random(seed).sample(range(total), n))
    return {k: [v[i] for i in idx] for k, v in columns.items()}


def split_train(columns: dict[str, list], max_train_samples: int | None, val_size: int | float | None,
                seed: int) -> tuple[dict[str, list], dict[str, list] | None]:
    """(training rows, validation rows or None): with ``val_size`` (a count, or a fraction in (0, 1)) a seeded
    validation split is carved out of the training rows first, and the training subset is drawn from the rest,
    so the two never share a row and ``max_train_samples`` still counts training rows."""
    if not val_size:
        return subsample(columns, max_train_samples, seed), None
    total = len(next(iter(columns.values())))
    k = round(total * val_size) if isinstance(val_size, float) else int(val_size)
    if not 1 <= k < total:
        raise DataError(f"val_size: {val_size!r} leaves no training rows or no validation rows of {total}")
    held = set(random.Random(f"val_size:{seed}").sample(range(total), k))
    rest = [i for i in range(total) if i not in held]
    pick = lambda idx: {c: [v[i] for i in idx] for c, v in columns.items()}
    return subsample(pick(rest), max_train_samples, seed), pick(sorted(held))


VAL_SIZE_FAMILIES = ("glue", "commonsense", "classification", "regression")


def load_task(task: str, tokenizer, *, data_dir: str | None = None, max_length: int = 128,
              max_train_samples: int | None = None, max_eval_samples: int | None = None,
              seed: int = 0, train_on_inputs: bool = False, files=None, val_size: int | float | None = None,
              shuffle_labels: bool = False) -> TaskData:
    """Load, subsample and tokenize a task. See the module docstring for task ids; ``classification`` and
    ``regression`` read the user's own files or dataset as ``files`` (a ``files.FileSpec``) describes.

    ``val_size``: hold out that many training rows (or that fraction) as the validation split that selection
    reads; the task's own dev/test set becomes ``tests``. ``shuffle_labels``: permute the training labels
    (seeded), a control run whose labels carry no information about the texts."""
    data = _load_task(task, tokenizer, data_dir=data_dir, max_length=max_length, max_train_samples=max_train_samples,
                      max_eval_samples=max_eval_samples, seed=seed, train_on_inputs=train_on_inputs, files=files,
                      val_size=val_size)
    if shuffle_labels:
        if data.kind not in ("classification", "regression"):
            raise DataError(f"shuffle_labels: needs a classification or regression task, not {data.kind}")
        labels = list(data.train["labels"])
        random.Random(f"shuffle_labels:{seed}").shuffle(labels)
        data.train = data.train.remove_columns("labels").add_column("labels", labels)
    return data


def _load_task(task: str, tokenizer, *, data_dir, max_length, max_train_samples, max_eval_samples, seed,
               train_on_inputs, files, val_size) -> TaskData:
    if tokenizer.pad_token_id is None:
        raise DataError(no_pad_message(tokenizer))
    if max_length < 1:
        raise DataError(f"max_length must be positive, got {max_length}")
    family, _, rest = task.partition("/")
    family = family.lower()
    opts = dict(max_length=max_length, max_train_samples=max_train_samples,
                max_eval_samples=max_eval_samples, seed=seed)
    if val_size:
        if family not in VAL_SIZE_FAMILIES:
            raise DataError(f"val_size: holds out a validation split for {', '.join(VAL_SIZE_FAMILIES)} tasks, "
                            f"not {task}")
        opts["val_size"] = val_size
    # Submodules are imported here, not at the top, because they import from this module.
    if family in ("classification", "regression") and not rest:
        from .files import FileSpec, load_files_task
        return load_files_task(family, files or FileSpec(), tokenizer, **opts)
    if family == "sft" and not rest:
        from .files import FileSpec
        from .sft import load_sft
        return load_sft(files or FileSpec(), tokenizer, train_on_inputs=train_on_inputs, **opts)
    if family == "glue" and rest:
        from .glue import load_glue
        return load_glue(rest, tokenizer, resolve_data_dir(data_dir), **opts)
    if family == "commonsense" and rest:
        from .commonsense import load_commonsense
        return load_commonsense(rest, tokenizer, _local_dir(task, data_dir),
                                train_on_inputs=train_on_inputs, **opts)
    if family == "text" and rest:
        from .text import load_text
        return load_text(rest, tokenizer, _local_dir(task, data_dir), train_on_inputs=train_on_inputs, **opts)
    if family == "builtin" and rest:
        from .builtin import load_builtin
        return load_builtin(rest, tokenizer, **opts)
    raise DataError(f"task: unknown task {task!r}: expected classification, regression, sft, glue/<task>, "
                    "commonsense/<name>, text/<file> or builtin/vader, builtin/pydoc")


def _local_dir(task: str, data_dir: str | None) -> str:
    data_dir = resolve_data_dir(data_dir)
    if data_dir is None:
        raise DataError(f"{task} has no hub source: pass data_dir or set QKVTUNE_DATA to the data folder")
    return data_dir


__all__ = ["DataError", "TaskData", "PadCollator", "load_task"]
