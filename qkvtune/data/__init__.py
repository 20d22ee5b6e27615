"""The data layer: ``load_task`` turns a data spec (a task id and its data keys, ``spec.py``) into tokenized
train/evaluation sets, a padding collator and Trainer metrics (``TaskData``).

Modules: ``spec`` (the data keys, their checks, held-out rows, text columns; no heavy imports, so the config
uses it), ``load`` (the dispatch by task family and where data lies), ``examples`` (``TaskData``, the collator,
text tokenization), ``metrics`` (each task's main metric, chosen and computed), and one loader per family:
``files`` (your own classification/regression data), ``sft``, ``glue``, ``commonsense``, ``text``, ``builtin``.

This face imports lazily, so ``from qkvtune.data.spec import DataSpec`` stays cheap.
"""

from ..errors import DataError
from .spec import DataSpec, split_train, subsample

_LAZY = {"TaskData": "examples", "PadCollator": "examples", "tokenize_texts": "examples",
         "load_task": "load", "read_text": "load", "resolve_data_dir": "load", "find_dir": "load"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "DataSpec", "TaskData", "PadCollator", "load_task", "split_train", "subsample"]
