"""The data spec: every config key that says which data a run reads and how it is cut, with its default, defined
once and checked once.

``DataSpec`` is the base of ``config.TrainConfig`` (so the keys are config keys, documented in the README's
configuration reference) and what ``load_task`` takes; ``check()`` is the one validation of those keys, called
by the config, by ``load_task`` and by ``predict``: the rules every task obeys, then those of the task's family
(``families/``: which optional keys it offers, and its own rules).

Adding a data key: a field here, its rule in ``check()`` (or its family's), a row in the README's configuration
reference, and its use in the loader that reads it.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass

from ..errors import ConfigError
from .families import find_family, offering

# What an optional key does, for the message that refuses it on a family that does not offer it.
WHAT = {"val_size": "holds out a validation split", "shuffle_labels": "permutes the training labels",
        "packing": "packs causal-LM examples", "as_chat": "renders sft records through the chat template",
        "reward": "names the rewards of RL on prompts"}


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
    reward: typing.Any = None              # task prompts: answer (the default) | regex:<pattern> |
                                           # module:function, or a list of them, summed (qkvtune/rewards.py)

    @classmethod
    def of(cls, settings) -> "DataSpec":
        """The data keys of ``settings`` (a ``TrainConfig``) alone."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})

    def check(self) -> None:
        """Refuse, naming the key, data keys that cannot work together (before any data is read)."""
        fam = find_family(self.task) if isinstance(self.task, str) else None  # unknown: load_task says so
        if fam is not None:
            fam.check(self)
        if self.train_file and self.dataset:
            raise ConfigError("train_file and dataset: give one source of training data, not both")
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
        offered = fam.offered(self.task) if fam is not None else frozenset()
        for key, what in WHAT.items():
            if getattr(self, key) not in (None, False) and key not in offered:
                raise ConfigError(f"{key}: {what} (task {offering(key)}), not {self.task}")
        for key in ("max_train_samples", "max_eval_samples", "max_length"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"{key}: must be > 0, got {value!r}")
