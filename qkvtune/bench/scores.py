"""What a claim reads of a run: the task's main metric on a split (validation: ``eval_*``, what selection
reads; test: ``test_*``, what is reported) and which way is better, per-example test scores for the interval, the
score of the best constant predictor, the testability gate, and whether a curve is still rising at its cap."""

from __future__ import annotations

import math

import numpy as np

from ..data.families import main_metric, task_kind
from ..data.metrics import PER_EXAMPLE, greater_is_better
from ..task import QA_GENERATION


def higher_better(task: str) -> bool:
    """Whether a higher score is better on ``task`` (its main metric; a loss: lower is)."""
    return greater_is_better(main_metric(task))


def direction(task: str) -> float:
    """+1 where higher is better, −1 for a loss: direction·(a − b) is how much better a is than b."""
    return 1.0 if higher_better(task) else -1.0


def score_key(task: str, split: str = "eval") -> str:
    return f"{split}_{main_metric(task)}"


def score_of(record: dict, task: str, split: str = "eval"):
    """The task's score on ``split`` in a metrics / log record; with several dev sets (MNLI's matched and
    mismatched) Trainer names them <split>_<set>_<metric>, and the first set's counts."""
    key = score_key(task, split)
    if key in record:
        return record[key]
    metric = key[len(split) + 1:]
    return next((v for k, v in record.items() if k.startswith(split + "_") and k.endswith("_" + metric)), None)


def per_example(task: str):
    """``fn(labels, predictions) -> score`` for the task's main metric, or None where it is a mean of per-example
    correctness (accuracy; generation accuracy), which the bootstrap then resamples directly."""
    return PER_EXAMPLE.get(main_metric(task))


def encode(labels: list, predictions: list, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, row) for the bootstrap: per-example correctness (0/1) where the metric is a mean of it,
    else the predictions themselves (class ids, scores) next to numeric labels."""
    if per_example(task) is None:
        return np.zeros(len(labels)), np.array([float(p == y) for p, y in zip(predictions, labels)])
    return np.asarray(labels, dtype=float), np.asarray([np.nan if p is None else p for p in predictions], dtype=float)


def score_predictions(task: str, labels: list, predictions: list) -> float:
    """The main metric from a split's per-example labels and predictions (as ``test_predictions.json`` holds
    them): accuracy where it is a mean of correctness, else the task's metric function."""
    y, row = encode(labels, predictions, task)
    fn = per_example(task)
    return float(row.mean()) if fn is None else float(fn(y, row))


def majority(labels: list) -> float:
    """The accuracy of always answering the most frequent label."""
    return max(sum(y == c for y in labels) / len(labels) for c in set(labels))


def gate(task: str, metrics: dict, labels: list, choices: list | None, rule: dict) -> tuple[bool, str]:
    """Whether the reference arm clearly learned, by its *validation* metrics: accuracy ``rule['over_constant']``
    above the majority class (tasks scored by accuracy or F1), MCC ≥ ``rule['matthews_correlation']``, Pearson
    ≥ ``rule['pearson']``, generation accuracy ``over_constant`` above max(chance, the most frequent answer)."""
    name = main_metric(task)
    margin = float(rule.get("over_constant", 0.10))
    if name in ("matthews_correlation", "pearson"):
        value, need = metrics.get(f"eval_{name}"), float(rule.get(name, 0.2 if name == "matthews_correlation" else 0.5))
        what = name
    else:
        value = metrics.get("eval_accuracy")
        base = majority(labels)
        if choices and task_kind(task) == QA_GENERATION:  # generated answers: chance among the choices
            base = max(base, 1 / len(choices))
        need, what = base + margin, f"accuracy (constant {base:.3f} + {margin:.2f})"
    if value is None:
        return False, f"no validation {name}"
    return value >= need, f"validation {what}: {value:.3f} vs needed {need:.3f}"


def loss_gate(with_delta: float, without: float, drop: float) -> tuple[bool, str]:
    """A task judged by a loss learned when the run's validation loss is at least ``drop`` (a fraction) below the
    same model's with ΔW removed (for a causal LM: the pretrained model)."""
    if not (math.isfinite(with_delta) and math.isfinite(without)):
        return False, "no validation loss"
    need = without * (1 - drop)
    return with_delta <= need, f"validation loss {with_delta:.4f} vs needed {need:.4f} ({drop:.0%} below {without:.4f} without ΔW)"


def still_rising(history: list[dict], task: str, global_step, max_steps, margin: float) -> bool:
    """Trained to its step cap and its last validation evaluation beats every earlier one by more than ``margin``
    (score units; for a loss, a fraction of the earlier best): the curve had not converged when the cap stopped it."""
    if not max_steps or global_step is None or int(global_step) < int(max_steps):
        return False
    curve = [v for h in history if h.get("step") is not None and (v := score_of(h, task)) is not None
             and "train_runtime" not in h]
    if len(curve) < 2:
        return False
    last, earlier = curve[-1], curve[:-1]
    if higher_better(task):
        return last - max(earlier) > margin
    best = min(earlier)
    return best - last > margin * abs(best)
