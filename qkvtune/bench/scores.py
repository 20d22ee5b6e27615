"""Which score a claim reads for a task: the task's main dev metric, under the name Trainer logs it."""

from __future__ import annotations


def score_key(task: str) -> str:
    from ..data.metrics import glue_metrics

    family, _, name = task.partition("/")
    return f"eval_{glue_metrics(name)[1]}" if family == "glue" else "eval_accuracy"


def score_of(record: dict, task: str):
    """The task's dev score in a metrics / log record; with several dev sets (MNLI's matched and mismatched)
    Trainer names them eval_<set>_<metric>, and the first set's counts."""
    key = score_key(task)
    if key in record:
        return record[key]
    metric = key[len("eval_"):]
    return next((v for k, v in record.items() if k.startswith("eval_") and k.endswith("_" + metric)), None)
