"""The data layer: ``load_task`` turns a data spec (a task id and its data keys, ``spec.py``) into tokenized
train/evaluation sets, a padding collator and Trainer metrics (``TaskData``).

A task id belongs to a family (``families/``, one file each, ``family.py`` their contract): the family says the
task's kind, its main metric, which optional keys it offers and how its data is read. Below the families, shared
by them: ``sources`` (where data lies; text and JSON files), ``tables`` (your own files or dataset as rows),
``rows`` (held-out and subsampled rows, text columns), ``examples`` (``TaskData``, the collator, text
tokenization), ``causal`` (causal-LM examples), ``answers`` (generated answers scored), ``metrics``.

This face imports lazily, so ``from qkvtune.data import DataSpec`` stays cheap.
"""

from ..errors import DataError

_LAZY = {"DataSpec": "spec", "TaskData": "examples", "PadCollator": "examples", "tokenize_texts": "examples",
         "load_task": "load", "read_text": "sources", "resolve_data_dir": "sources", "find_dir": "sources",
         "split_train": "rows", "subsample": "rows", "family_of": "families", "task_kind": "families",
         "main_metric": "families"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DataError", "DataSpec", "TaskData", "PadCollator", "load_task", "split_train", "subsample",
           "family_of", "task_kind", "main_metric"]
