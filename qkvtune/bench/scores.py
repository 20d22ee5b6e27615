"""What a claim reads of a run: the task's main metric on a split (validation: ``eval_*``, what selection
reads; test: ``test_*``, what is reported), per-example test scores for the bootstrap, the score of the best
constant predictor, and the testability gate."""

from __future__ import annotations

import numpy as np

from ..data.metrics import PER_EXAMPLE, main_metric


def metric_name(task: str) -> str:
    return main_metric(task)


def score_key(task: str, split: str = "eval") -> str:
    return f"{split}_{metric_name(task)}"


def score_of(record: dict, task: str, split: str = "eval"):
    """The task's score on ``split`` in a metrics / log record; with several dev sets (MNLI's matched and
    mismatched) Trainer names them <split>_<set>_<metric>, and the first set's counts."""
    key = score_key(task, split)
    if key in record:
        return record[key]
    metric = key[len(split) + 1:]
    return next((v for k, v in record.items() if k.startswith(split + "_") and k.endswith("_" + metric)), None)


def metric(task: str):
    """``fn(labels, predictions) -> score`` for the task's main metric, or None where it is a mean of per-example
    correctness (accuracy; generation accuracy), which the bootstrap then resamples directly."""
    return PER_EXAMPLE.get(metric_name(task))


def encode(labels: list, predictions: list, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, row) for the bootstrap: per-example correctness (0/1) where the metric is a mean of it,
    else the predictions themselves (class ids, scores) next to numeric labels."""
    if metric(task) is None:
        return np.zeros(len(labels)), np.array([float(p == y) for p, y in zip(predictions, labels)])
    return np.asarray(labels, dtype=float), np.asarray([np.nan if p is None else p for p in predictions], dtype=float)


def constant_score(task: str, labels: list, choices: list | None = None) -> float:
    """The best score a constant prediction gets on these labels (majority-class accuracy, the F1 of always
    answering the positive class, 0 for correlations and MCC, the most frequent answer's rate)."""
    if metric_name(task) in ("pearson", "matthews_correlation"):
        return 0.0
    fn = metric(task)
    if fn is None:
        return majority(labels)
    candidates = sorted(set(labels) | set(choices or []), key=str)
    return max(fn(np.asarray(labels), np.full(len(labels), c)) for c in candidates)


def majority(labels: list) -> float:
    """The accuracy of always answering the most frequent label."""
    return max(sum(y == c for y in labels) / len(labels) for c in set(labels))


def gate(task: str, metrics: dict, labels: list, choices: list | None, rule: dict) -> tuple[bool, str]:
    """Whether the reference arm clearly learned, by its *validation* metrics: accuracy ``rule['over_constant']``
    above the majority class (tasks scored by accuracy or F1), MCC ≥ ``rule['matthews_correlation']``, Pearson
    ≥ ``rule['pearson']``, generation accuracy ``over_constant`` above max(chance, the most frequent answer)."""
    name = metric_name(task)
    margin = float(rule.get("over_constant", 0.10))
    if name in ("matthews_correlation", "pearson"):
        value, need = metrics.get(f"eval_{name}"), float(rule.get(name, 0.2 if name == "matthews_correlation" else 0.5))
        what = name
    else:
        value = metrics.get("eval_accuracy")
        base = majority(labels)
        if task.startswith("commonsense/") and choices:
            base = max(base, 1 / len(choices))
        need, what = base + margin, f"accuracy (constant {base:.3f} + {margin:.2f})"
    if value is None:
        return False, f"no validation {name}"
    return value >= need, f"validation {what}: {value:.3f} vs needed {need:.3f}"
