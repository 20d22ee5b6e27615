"""The data spec: every config key that says which data a run reads and how it is cut, with its default, defined
once and checked once.

``DataSpec`` is the base of ``config.TrainConfig`` (so the keys are config keys, documented in the README's
configuration reference) and what ``load_task`` takes; ``check()`` is the one validation of those keys, called
by the config, by ``load_task`` and by ``predict``. Rows are held out (``validation_fraction``, ``val_size``)
and subsampled (``max_train_samples``, ``max_eval_samples``) here too, and the text columns of a table are
chosen here. No heavy imports: the config imports this module.

Adding a data key: a field here, its rule in ``check()``, a row in the README's configuration reference, and
its use in the loader that reads it.
"""

from __future__ import annotations

import dataclasses
import os
import random
import typing
from dataclasses import dataclass

from ..errors import ConfigError, DataError

# What each task id family offers (a family is the part before "/"; builtin tasks are named whole).
OWN_TABLES = ("classification", "regression")  # the user's table rows: text column(s) and a label column
OWN_DATA = OWN_TABLES + ("sft",)  # read from the user's files or dataset
LABELLED = ("glue", "classification", "regression", "builtin/vader")  # a label per example: shuffle_labels
HOLDS_OUT = ("glue", "commonsense", "classification", "regression", "sft")  # a test split besides validation: val_size
LANGUAGE_MODELLING = ("sft", "text")  # causal-LM examples: packing
TEXT_GUESSES = ("text", "sentence", "prompt")  # predict's text column when none is configured


def family(task: str) -> str:
    return task.partition("/")[0].lower()


def offers(task: str, what: tuple[str, ...]) -> bool:
    """Whether ``task`` (an id such as glue/sst2) belongs to one of the families or ids in ``what``."""
    return family(task) in what or task.lower() in what


@dataclass
class DataSpec:
    task: str = "builtin/vader"            # classification | regression | sft (your own files or dataset), glue/<task>,
                                           # commonsense/<task>, text/<file>, builtin/vader, builtin/pydoc
    data_dir: str | None = None            # folder laid out like shared/datasets; else $QKVTUNE_DATA; else the hub
    # your own data (task: classification | regression | sft), as in transformers' run_glue.py
    train_file: typing.Any = None          # CSV, TSV, JSON, JSONL or Parquet (by extension), or a list of files
    validation_file: typing.Any = None     # same; without it (and without validation_split) a fraction is held out
    dataset: str | None = None             # a hub dataset id or a local dataset folder, instead of train_file
    dataset_config: str | None = None
    train_split: str = "train"
    validation_split: str | None = None
    text_columns: typing.Any = None        # one column, or two for sentence pairs: [premise, hypothesis]
    label_column: str = "label"
    labels: list | None = None             # class names in id order (default: the sorted distinct labels)
    validation_fraction: float = 0.1      # held out of the training rows (seeded) when no validation data is given
    val_size: typing.Any = None            # a count or fraction of training rows held out (seeded) as the validation
                                           # split that selection reads; the dev/test set becomes the test split
                                           # (test_* metrics, test_predictions.json), never selected on
    shuffle_labels: bool = False           # permute the training labels (seeded): a control run that cannot learn
    chat_template: str | None = None       # a Jinja chat template file (task: sft with messages; predict)
    as_chat: bool = False                  # sft: prompt/completion and Alpaca records as a one-turn chat through
                                           # the tokenizer's chat template (user: the prompt, assistant: the answer)
    # how much of it, and how long
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_length: int = 128
    train_on_inputs: bool = False          # causal LM: also learn the prompt tokens
    packing: bool = False                  # task sft | text/…: pack training examples into rows of max_length tokens,
                                           # positions restarting per example (data/packing.py)

    @classmethod
    def of(cls, settings) -> "DataSpec":
        """The data keys of ``settings`` (a ``TrainConfig``) alone."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    @property
    def family(self) -> str:
        return family(self.task)

    def check(self) -> None:
        """Refuse, naming the key, data keys that cannot work together (before any data is read)."""
        if self.task in OWN_DATA and not self.train_file and not self.dataset:
            raise ConfigError(f"task: {self.task} needs train_file (CSV, TSV, JSON, JSONL or Parquet) or dataset")
        if self.train_file and self.dataset:
            raise ConfigError("train_file and dataset: give one source of training data, not both")
        if self.task in OWN_TABLES and self.text_columns is None:
            raise ConfigError(f"text_columns: task {self.task} needs the text column(s), e.g. text_columns: [sentence]")
        for key in ("train_file", "validation_file"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, str) and value) and not (
                    isinstance(value, list) and value and all(isinstance(v, str) and v for v in value)):
                raise ConfigError(f"{key}: expected a file path or a list of paths, got {value!r}")
        tc = [c.strip() for c in self.text_columns.split(",")] if isinstance(self.text_columns, str) else self.text_columns
        if tc is not None and (not isinstance(tc, list) or not 1 <= len(tc) <= 2 or
                               not all(isinstance(c, str) and c for c in tc)):
            raise ConfigError(f"text_columns: one column name, or two for sentence pairs; got {tc!r}")
        if self.labels is not None and (not isinstance(self.labels, list) or len(self.labels) < 2
                                        or len({str(v) for v in self.labels}) != len(self.labels)):
            raise ConfigError(f"labels: expected at least two distinct class names, got {self.labels!r}")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ConfigError(f"chat_template: {self.chat_template} is not a file")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(f"validation_fraction: must be in (0, 1), got {self.validation_fraction!r}")
        v = self.val_size
        if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v >= 1) and \
                not (isinstance(v, float) and 0 < v < 1):
            raise ConfigError(f"val_size: expected a row count >= 1 or a fraction in (0, 1), got {v!r}")
        if v is not None and not offers(self.task, HOLDS_OUT):
            raise ConfigError(f"val_size: holds out a validation split for glue/…, commonsense/…, classification, "
                              f"regression and sft tasks, not {self.task}")
        if self.as_chat and self.family != "sft":
            raise ConfigError(f"as_chat: renders sft records through the chat template (task: sft), not {self.task}")
        if self.shuffle_labels and not offers(self.task, LABELLED):
            raise ConfigError(f"shuffle_labels: needs a classification or regression task, not {self.task}")
        if self.packing and not offers(self.task, LANGUAGE_MODELLING):
            raise ConfigError(f"packing: packs causal-LM examples (task sft or text/…), not {self.task}")
        for key in ("max_train_samples", "max_eval_samples", "max_length"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value!r}")


# --- cutting rows ------------------------------------------------------------------------------------------

def hold_out(n: int, k: int, seed) -> tuple[list[int], list[int]]:
    """(kept, held) row indices, in order: ``k`` of ``n`` rows held out, drawn by ``random.Random(seed)``."""
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


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
    rest, held = hold_out(total, k, f"val_size:{seed}")
    pick = lambda idx: {c: [v[i] for i in idx] for c, v in columns.items()}
    return subsample(pick(rest), max_train_samples, seed), pick(held)


# --- columns -----------------------------------------------------------------------------------------------

def text_columns(given, columns, where: str, guess: bool = False) -> list[str]:
    """The text column(s) of a table with ``columns``: ``given`` (one, or two for a pair, as ``check`` allows),
    else — where ``guess`` (predict on a model that names none) — the first of text, sentence, prompt present.
    A column the table lacks is a ``DataError`` naming ``where`` and the columns it has."""
    wanted = [c.strip() for c in given.split(",")] if isinstance(given, str) else list(given or [])
    if not wanted and guess:
        wanted = [c for c in TEXT_GUESSES if c in columns][:1]
    if not 1 <= len(wanted) <= 2 or not all(isinstance(c, str) and c for c in wanted):
        raise ConfigError(f"text_columns: name the text column, or two for sentence pairs; the columns are "
                          f"{', '.join(map(str, columns))}" if not wanted else
                          f"text_columns: one column name, or two for sentence pairs; got {given!r}")
    for c in wanted:
        if c not in columns:
            raise DataError(f"{where}: no column {c!r}; the columns are {', '.join(map(str, columns))}")
    return wanted
