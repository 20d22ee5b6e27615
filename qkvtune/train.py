"""A run, whole: the config's model, adapter and task data (``runs.build``) trained by ``trainer.QkvTrainer`` (or,
for preference pairs, ``dpo.QkvDPOTrainer``; for prompts with a reward, ``grpo.QkvGRPOTrainer``), evaluated, and written out: the adapter, metrics.json, config.yaml
and loss.png. ``patience`` is ``callbacks.PatienceCallback``."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import torch

from . import attach, checkpoints, chunked_loss, io, runs, sharding
from .callbacks import PatienceCallback, ntk_stopping
from .config import ConfigError, TrainConfig, save_config
from .errors import check_output_dir
from .evaluation import evaluate_all, metric_key
from .files import write_json
from .models import default_dtype
from .optim import param_groups
from .runs import is_main_process
from .trainer import QkvTrainer, training_arguments


PREDICTIONS_FILE = "test_predictions.json"


def plot_losses(log_history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = next((i for i, h in enumerate(log_history) if "train_runtime" in h), len(log_history))
    log_history = log_history[:end]  # the final evaluations after training are reported in metrics.json
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _resume_arg(cfg: TrainConfig):
    """The checkpoint to continue from: the newest *complete* one for ``resume: true`` (a checkpoint a
    kill interrupted is removed), a checked path, or None for a fresh run."""
    if cfg.resume is True:
        return checkpoints.last_complete(cfg.output_dir, remove_incomplete=is_main_process())
    if cfg.resume:
        return checkpoints.check_resumable(cfg.resume)
    if not cfg.overwrite and (checkpoints.checkpoints(cfg.output_dir) or
                              os.path.exists(os.path.join(cfg.output_dir, "config.yaml"))):
        raise ConfigError(f"output_dir: {cfg.output_dir} already holds a run; pass resume=true to continue it, "
                          "overwrite=true to start again there, or another output_dir")
    return None


def train(cfg: TrainConfig) -> dict:
    """Run a whole fine-tuning job; leaves the adapter, metrics.json, config.yaml and loss.png in output_dir.
    Holds a lock on output_dir for the whole run (one writer at a time)."""
    check_output_dir(cfg.output_dir)
    lock = checkpoints.lock_output_dir(cfg.output_dir) if is_main_process() else None
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.close()


def _train(cfg: TrainConfig) -> dict:
    if default_dtype(cfg.dtype) == torch.float16 and not torch.cuda.is_available():
        raise ConfigError("dtype: float16 trains with a gradient scaler, which needs CUDA; use float32 or bfloat16")
    if cfg.fsdp and sharding.world_size() < 2:
        raise ConfigError("fsdp: shards across processes; launch with torchrun --nproc_per_node N (or accelerate "
                          "launch --config_file configs/accelerate/fsdp.yaml)")
    resume = _resume_arg(cfg)
    run = runs.build(cfg, resume)
    if cfg.lr == "auto":  # chosen on this model, adapter and data before the run (a resumed run probes again)
        from .autolr import choose_rate

        lr, record = choose_rate(cfg, run)
        cfg = run.cfg = replace(cfg, lr=lr, lr_auto=record)
    model, task = run.model, run.task
    metric = task.metric_for_best if task.metric_for_best == "loss" else metric_key(task, task.metric_for_best)
    args = training_arguments(cfg, task, metric, task.greater_is_better, bool(task.evals),
                              sharding.layer_classes(model, [t.module for t in run.targets]) if cfg.fsdp else ())
    callbacks = [PatienceCallback(cfg.patience, metric, metric_key(task, "loss"), task.greater_is_better)] \
        if cfg.patience else []
    if cfg.early_stopping == "ntk":
        callbacks.append(ntk_stopping(run))
    eval_sets = task.evals if len(task.evals) > 1 else next(iter(task.evals.values()), None)
    settings = {"config": cfg.to_dict(), "task": runs.task_settings(run),
                "learning_rates": {g["name"]: g["lr"] for g in param_groups(model, cfg)}}
    train_set, collator = task.train, task.collator
    if cfg.packing:  # the training rows only: evaluation and predict stay unpacked
        from .packing import packed_training

        train_set, collator = packed_training(model, task.train, task.collator, cfg.max_length)
    common = dict(callbacks=callbacks, rates=cfg, settings=settings, on_nonfinite=cfg.on_nonfinite,
                  max_nonfinite_skips=cfg.max_nonfinite_skips)
    if task.preference:  # DPO through TRL, the reference being this model with its deltas off
        from . import dpo

        args = dpo.dpo_arguments(cfg, args)
        trainer = dpo.build_trainer(model, run.tokenizer, args, train_set, eval_sets, run.adapter, **common)
    elif task.rewarded:  # GRPO through TRL, generating with this model
        from . import grpo

        args = grpo.grpo_arguments(cfg, args)
        trainer = grpo.build_trainer(model, run.tokenizer, args, train_set, eval_sets, cfg.reward, run.adapter,
                                     **common)
    else:
        trainer = QkvTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_sets,
                             data_collator=collator, compute_metrics=task.compute_metrics,
                             lm_loss=chunked_loss.for_run(model, cfg.chunked_loss, task), **common)
    result = trainer.train(resume_from_checkpoint=resume)
    predictions = {}
    metrics = evaluate_all(trainer, model, run.tokenizer, task, cfg, predictions, adapter=run.adapter)
    metrics.update(task.info)  # e.g. sft's num_truncated
    metrics.update({"train_loss": result.training_loss, "global_step": result.global_step,
                    "train_runtime": result.metrics.get("train_runtime"),
                    "trainable_parameters": attach.trainable_parameters(model)[0]})
    with sharding.gathered(model):  # FSDP: every rank gathers, rank 0 writes
        if trainer.is_world_process_zero():
            io.save_adapter(model, cfg.output_dir, extra=settings)
    if trainer.is_world_process_zero():
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
        if predictions:  # per-example test predictions: what a bootstrap over test examples resamples
            write_json(os.path.join(cfg.output_dir, PREDICTIONS_FILE), predictions)
        plot_losses(trainer.state.log_history, os.path.join(cfg.output_dir, "loss.png"))
    return metrics


def evaluate_run(run_dir: str, overrides: dict | None = None) -> dict:
    """Re-evaluate a finished run on its task (``overrides`` may change task, data_dir, max_eval_samples …)."""
    run = runs.open_run(run_dir, overrides)
    args = training_arguments(run.cfg, run.task, "loss", False, has_eval=False)  # evaluate() only, no loop
    if run.task.preference:
        from .dpo import dpo_arguments

        args = dpo_arguments(run.cfg, args)
    trainer = QkvTrainer(model=run.model, args=args, data_collator=run.task.collator, rates=run.cfg,
                         compute_metrics=run.task.compute_metrics,
                         lm_loss=chunked_loss.for_run(run.model, run.cfg.chunked_loss, run.task))
    return evaluate_all(trainer, run.model, run.tokenizer, run.task, run.cfg, adapter=run.adapter)


def dump_metrics(metrics: dict) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True)
