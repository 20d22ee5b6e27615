"""Trainer callbacks that drive training: ``patience`` and ``early_stopping: ntk`` (Sun & Raskutti,
arXiv 2602.13942).

The NTK prediction itself is pure math in ``analysis.stopping``; this module turns it into a stop at the
predicted step for a run's own slices and schedule, and records predicted against observed best step.
"""

from __future__ import annotations

import math
import os

from transformers import TrainerCallback

from .analysis import AnalysisError
from .analysis.ntk import empirical_ntk
from .files import write_json
from .analysis.stopping import StoppingPrediction, predict_stopping, steps_per_epoch
from .config import ConfigError
from .targets import Target


class PatienceCallback(TrainerCallback):
    """``patience: N``: stop after N evaluations in a row at which neither the selection metric nor the validation
    loss improved. Trainer's EarlyStoppingCallback watches the metric alone, and a classifier on the majority-class
    plateau looks converged by its accuracy while its loss still falls (MRPC: validation accuracy equals the
    majority share for the first ~100 steps of MiniLM, and that callback stopped every run there). ``metric`` and
    ``loss`` are the keys without ``eval_`` (``metric`` may be the loss itself)."""

    def __init__(self, patience: int, metric: str, loss: str = "loss", greater_is_better: bool = True):
        self.patience, self.metric, self.loss, self.greater = patience, metric, loss, greater_is_better
        self.best_metric: float | None = None
        self.best_loss: float | None = None
        self.waited = 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        metrics = metrics or {}
        value, loss = metrics.get(f"eval_{self.metric}"), metrics.get(f"eval_{self.loss}")
        if value is None and loss is None:  # another evaluation (e.g. a test split), not the validation split
            return
        better = False
        if value is not None and math.isfinite(value):
            if self.best_metric is None or (value > self.best_metric if self.greater else value < self.best_metric):
                self.best_metric, better = value, True
        if loss is not None and math.isfinite(loss) and (self.best_loss is None or loss < self.best_loss):
            self.best_loss, better = loss, True
        self.waited = 0 if better else self.waited + 1
        if self.waited >= self.patience:
            control.should_training_stop = True


class NTKEarlyStoppingCallback(TrainerCallback):
    """Stop training at a predicted step (``stop=True``) and record predicted vs observed best step.

    The observed best step is the evaluation step with the best ``args.metric_for_best_model``. When
    stopping, an evaluation and a save are requested at that step (if the run evaluates / saves), so the
    stopped model is scored. Trainer cannot stop before its first step, so T̂ = 0 stops after step 1.
    ``record`` (also appended to ``state.log_history`` at the end and written to ``record_path`` if given)
    holds predicted_step, observed_best_step, best_metric, stopped_at.
    """

    def __init__(self, predicted_step: int, stop: bool = True, record_path: str | None = None,
                 prediction: StoppingPrediction | None = None):
        if predicted_step < 0:
            raise AnalysisError(f"predicted_step: must be >= 0, got {predicted_step}")
        self.predicted_step = int(predicted_step)
        self.stop = stop
        self.record_path = record_path
        self.prediction = prediction
        self.best: tuple[float, int] | None = None
        self.record: dict = {}

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop and state.global_step >= max(self.predicted_step, 1):
            control.should_training_stop = True
            # score (and keep) the stopped model, so best-model tracking sees it
            control.should_evaluate = getattr(args, "eval_strategy", "no") != "no" or control.should_evaluate
            control.should_save = getattr(args, "save_strategy", "no") != "no" or control.should_save
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        name = args.metric_for_best_model or "loss"
        key = name if name.startswith("eval_") else f"eval_{name}"
        if not metrics or key not in metrics:
            return
        value = float(metrics[key])
        greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
        if self.best is None or (value > self.best[0] if greater else value < self.best[0]):
            self.best = (value, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.record = {"ntk_predicted_step": self.predicted_step,
                       "ntk_observed_best_step": self.best[1] if self.best else None,
                       "ntk_best_metric": self.best[0] if self.best else None,
                       "ntk_stopped_at": state.global_step, "step": state.global_step}
        if self.prediction is not None:
            self.record["ntk_predicted_epoch"] = self.prediction.epoch
            if "targets" in self.prediction.extra:
                self.record["ntk_targets"] = self.prediction.extra["targets"]
        state.log_history.append(dict(self.record))
        if self.record_path and state.is_world_process_zero:
            write_json(self.record_path, self.record)


def ntk_stopping_callback(model, train_examples, collator, targets: list[Target], *, lr: float, batch_size: int,
                          epochs: float = 3.0, max_steps: int | None = None, warmup_ratio: float = 0.0,
                          scheduler: str = "linear", grad_accum: int = 1, n: int = 256, output="margin",
                          label_token_ids=None, target_scale: float = 1.0, sigma: float | None = None,
                          stop: bool = True, record_path: str | None = None, chunk_size: int = 16,
                          sketch_dim: int | None = None) -> NTKEarlyStoppingCallback:
    """Compute the eNTK of the ``targets``' base weights on (up to) ``n`` training examples at the model's
    current weights, predict T̂ for the run's schedule and return the callback. The horizon is the run's
    length (``max_steps`` or ``epochs`` × steps per epoch over all ``train_examples``). Residual targets:
    ``NTKResult.label_targets`` (±scale margins, scaled one-hot logits, regression values)."""
    subset = [train_examples[i] for i in range(min(n, len(train_examples)))]
    res = empirical_ntk(model, subset, targets, collator=collator, output=output, label_token_ids=label_token_ids,
                        chunk_size=chunk_size, sketch_dim=sketch_dim)
    if res.labels is None:
        raise AnalysisError("labels: the training examples carry no per-example labels for residual targets")
    kernel = res.kernel if res.per_output is None else res.per_output.sum(0)
    spe = steps_per_epoch(len(train_examples), batch_size, grad_accum)
    total = max_steps or max(1, math.ceil(epochs * spe))
    pred = predict_stopping(kernel, residuals=res.label_targets(target_scale) - res.f0, sigma=sigma, lr=lr,
                            total_steps=total, warmup_ratio=warmup_ratio, scheduler=scheduler,
                            n_train=len(train_examples), batch_size=batch_size, grad_accum=grad_accum)
    pred.extra["targets"] = [t.name for t in targets]
    return NTKEarlyStoppingCallback(pred.step, stop=stop, record_path=record_path, prediction=pred)


def ntk_stopping(run) -> NTKEarlyStoppingCallback:
    """``early_stopping: ntk`` for a built run: the kernel of the slices the run trains (``run.targets``), at
    the weights before the first step, for the run's own schedule; the record goes to ntk_stopping.json."""
    cfg = run.cfg
    if not run.info.sequence_classifier:
        raise ConfigError(f"early_stopping: ntk needs a classification or regression task, not {run.info.kind}")
    if run.method.needs_selection:
        raise ConfigError(f"early_stopping: ntk is not available with method={cfg.method} (its blocks are chosen "
                          "by a warm-up, not known before training)")
    return ntk_stopping_callback(
        run.model, run.task.train, run.task.collator, run.targets, lr=cfg.lr, batch_size=cfg.batch_size,
        epochs=cfg.epochs, max_steps=cfg.max_steps, warmup_ratio=cfg.warmup_ratio, scheduler=cfg.scheduler,
        grad_accum=cfg.grad_accum, output=run.kernel_output,
        record_path=os.path.join(cfg.output_dir, "ntk_stopping.json"))
