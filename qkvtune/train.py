"""A thin layer over ``transformers.Trainer``: our parameter groups in, our adapter files out.

Trainer does the loop, gradient accumulation, evaluation, best-checkpoint selection, resume, early
stopping (``EarlyStoppingCallback``), logging and multi-process training (torchrun / accelerate launch).
``QkvTrainer`` changes only what is ours: the optimizer's groups (per matrix kind), and checkpoints,
which hold the adapter (qkvtune + PEFT layout) instead of the whole model.
"""

from __future__ import annotations

import json
import math
import os

import torch
from transformers import EarlyStoppingCallback, Trainer, TrainingArguments, set_seed

from . import attach, checkpoints, fastpath, io
from .errors import QkvtuneError
from .config import ConfigError, TrainConfig, save_config
from .models import default_dtype, load_model, load_tokenizer
from .optim import LearningRates, param_groups
from .targets import find_targets


class NonFiniteError(QkvtuneError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


class QkvTrainer(Trainer):
    def __init__(self, *args, rates: LearningRates, settings: dict | None = None, on_nonfinite: str = "stop",
                 max_nonfinite_skips: int = 10, **kwargs):
        self.rates = rates
        self.settings = settings or {}
        self.on_nonfinite, self.max_nonfinite_skips, self.nonfinite_skips = on_nonfinite, max_nonfinite_skips, 0
        super().__init__(*args, **kwargs)
        # Trainer assumes a forward(**kwargs) normalises its loss by num_items_in_batch and then multiplies
        # the loss by the number of processes; sequence classifiers ignore that kwarg, so under DDP their
        # gradients came out world_size times too large. Only causal LMs really use it.
        if not type(self.model).__name__.endswith("ForCausalLM"):
            self.model_accepts_loss_kwargs = False

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = cls(param_groups(self.model, self.rates), **kwargs)
            self.optimizer.step = self._guarded(self.optimizer.step)
        return self.optimizer

    # --- numerical faults: never let a NaN/inf reach the weights ---
    def _nonfinite(self, what: str) -> None:
        last = checkpoints.last_complete(self.args.output_dir)
        raise NonFiniteError(f"non-finite {what} at step {self.state.global_step + 1}; "
                             f"last good checkpoint: {last or 'none'} (resume=true continues from it)")

    def _guarded(self, step):
        def guarded_step(*args, **kwargs):
            grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
                if self.on_nonfinite == "skip" and self.nonfinite_skips < self.max_nonfinite_skips:
                    self.nonfinite_skips += 1
                    return None  # the scheduler still advances; Trainer zeroes the gradients
                self._nonfinite("gradient")
            return step(*args, **kwargs)
        return guarded_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.on_nonfinite == "stop" and not torch.isfinite(loss).all():
            self._nonfinite("loss")
        return loss

    # --- checkpoints: complete only once sealed (see checkpoints.py) ---
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            checkpoints.seal(os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}"))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            io.save_adapter(self.model, output_dir or self.args.output_dir, extra=self.settings)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        io.restore_adapter(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        io.restore_adapter(self.model, self.state.best_model_checkpoint)


def learning_rates(cfg: TrainConfig) -> LearningRates:
    return LearningRates(lr=cfg.lr, lr_ratio=cfg.lr_ratio, lr_q=cfg.lr_q, lr_k=cfg.lr_k, lr_v=cfg.lr_v,
                         lr_o=cfg.lr_o, lr_head=cfg.lr_head, loraplus_ratio=cfg.loraplus_ratio,
                         weight_decay=cfg.weight_decay)


def training_arguments(cfg: TrainConfig, kind: str, metric: str, greater: bool, has_eval: bool) -> TrainingArguments:
    evaluate = cfg.eval_strategy if has_eval else "no"
    dtype = default_dtype(cfg.dtype)
    return TrainingArguments(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        lr_scheduler_type=cfg.scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float < 1 is a fraction of all steps
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        eval_strategy=evaluate,
        eval_steps=cfg.eval_steps,
        save_strategy=evaluate if evaluate != "no" else "epoch",
        save_steps=cfg.eval_steps or 500,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=evaluate != "no",
        metric_for_best_model=metric,
        greater_is_better=greater,
        logging_steps=cfg.logging_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),
        prediction_loss_only=kind in ("causal_lm", "qa_generation"),  # never gather LM logits
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
    )


def _smt_blocks(cfg: TrainConfig, model, task, resume: str | None):
    """SMT's targets and hparams: the selection of the checkpoint being resumed (never re-selected), or a
    fresh warm-up + selection (report written to output_dir), or the user's fixed selection."""
    from . import smt

    smallest = min(min(t.shape) for t in smt.eligible_targets(model, cfg.smt_targets, layers=cfg.layers))
    if cfg.block_size > smallest:
        raise ConfigError(f"block_size: {cfg.block_size} is larger than the smallest eligible matrix side "
                          f"({smallest}); use a block size that fits, e.g. {smallest // 2 or 1}")
    if resume:
        selection = io.read_json(os.path.join(resume, io.QKV_CONFIG))["hparams"]["blocks"]
        smt.check_selection(model, selection, cfg.block_size, where=resume)
    else:
        try:
            selection = smt.prepare_smt(
                model, task.train, task.collator, batch_size=cfg.batch_size, warmup_steps=cfg.smt_warmup_steps,
                block_size=cfg.block_size, budget=cfg.smt_budget, score=cfg.smt_score, kinds=cfg.smt_targets,
                per_matrix=cfg.smt_per_matrix, seed=cfg.seed, selection_path=cfg.smt_selection,
                out_dir=cfg.output_dir if _is_main() else None, layers=cfg.layers)
        except smt.SelectionError:
            raise
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return smt.targets_of(model, selection), {"block_size": cfg.block_size, "blocks": selection}


def prepare(cfg: TrainConfig, resume: str | None = None):
    """Model with the adapter attached, tokenizer and task data, all from the config (no training)."""
    from .data import load_task

    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    task = load_task(cfg.task, tokenizer, data_dir=cfg.data_dir, max_length=cfg.max_length,
                     max_train_samples=cfg.max_train_samples, max_eval_samples=cfg.max_eval_samples,
                     seed=cfg.seed, train_on_inputs=cfg.train_on_inputs)
    model, tokenizer, new_modules = load_model(cfg.model, task.kind, max(task.num_labels, 1), cfg.dtype,
                                               cfg.trust_remote_code, tokenizer, cfg.allow_pickle)
    if cfg.method == "smt":
        targets, hparams = _smt_blocks(cfg, model, task, resume)
    else:
        targets = find_targets(model, cfg.targets, cfg.layers, cfg.target_modules)
        hparams = {} if cfg.method == "dense" else {"rank": cfg.rank, "alpha": cfg.alpha, "rslora": cfg.rslora,
                                                     "dropout": cfg.dropout}
    try:
        attach.add_adapter(model, targets, cfg.method, heads=attach.find_heads(model, new_modules), **hparams)
    except ValueError as e:  # e.g. a rank above the matrix size: a config problem, named by its key
        raise ConfigError(str(e)) from None
    fast = fastpath.resolve(cfg.fast_path)
    if fast is not None:  # after the adapter, so its dropout is covered too
        fastpath.enable(model, **fast)
    return model, tokenizer, task


def _metric_key(task, name: str) -> str:
    return name if len(task.evals) <= 1 else f"{next(iter(task.evals))}_{name}"


def evaluate_all(trainer: Trainer, model, tokenizer, task, cfg: TrainConfig) -> dict:
    """Final metrics with GLUE names (eval_accuracy, eval_matthews_correlation, eval_pearson, …)."""
    metrics = {}
    if len(task.evals) == 1:
        metrics.update(trainer.evaluate(next(iter(task.evals.values()))))
    elif task.evals:
        for name, ds in task.evals.items():
            metrics.update(trainer.evaluate(ds, metric_key_prefix=f"eval_{name}"))
    if task.kind == "causal_lm" and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if task.kind == "qa_generation" and task.generation_records:
        from .data.commonsense import generation_accuracy

        for name, records in task.generation_records.items():
            result = generation_accuracy(model, tokenizer, records, batch_size=cfg.eval_batch_size,
                                         max_new_tokens=cfg.max_new_tokens, choices=task.answer_choices)
            prefix = "eval" if len(task.generation_records) == 1 else f"eval_{name}"
            metrics[f"{prefix}_accuracy"] = result["accuracy"]
            metrics[f"{prefix}_samples"] = result["n"]
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


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


def _ntk_callback(cfg: TrainConfig, model, task):
    """Predict the stopping step from the empirical NTK at the pretrained weights (before any training)."""
    from .analysis.stopping import ntk_stopping_callback

    if task.kind not in ("classification", "regression"):
        raise ConfigError(f"early_stopping: ntk needs a classification or regression task, not {task.kind}")
    if cfg.method == "smt":
        raise ConfigError("early_stopping: ntk is not available with method=smt")
    return ntk_stopping_callback(
        model, task.train, task.collator, lr=cfg.lr, batch_size=cfg.batch_size, epochs=cfg.epochs,
        max_steps=cfg.max_steps, warmup_ratio=cfg.warmup_ratio, scheduler=cfg.scheduler, grad_accum=cfg.grad_accum,
        kinds=cfg.targets, layers=cfg.layers, record_path=os.path.join(cfg.output_dir, "ntk_stopping.json"))


def _resume_arg(cfg: TrainConfig):
    """The checkpoint to continue from: the newest *complete* one for ``resume: true`` (a checkpoint a
    kill interrupted is removed), a checked path, or None for a fresh run."""
    if cfg.resume is True:
        return checkpoints.last_complete(cfg.output_dir, remove_incomplete=_is_main())
    if cfg.resume:
        return checkpoints.check_resumable(cfg.resume)
    if not cfg.overwrite and (checkpoints.checkpoints(cfg.output_dir) or
                              os.path.exists(os.path.join(cfg.output_dir, "config.yaml"))):
        raise ConfigError(f"output_dir: {cfg.output_dir} already holds a run; pass resume=true to continue it, "
                          "overwrite=true to start again there, or another output_dir")
    return None


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def train(cfg: TrainConfig) -> dict:
    """Run a whole fine-tuning job; leaves the adapter, metrics.json, config.yaml and loss.png in output_dir.
    Holds a lock on output_dir for the whole run (one writer at a time)."""
    lock = checkpoints.lock_output_dir(cfg.output_dir) if _is_main() else None
    try:
        return _train(cfg)
    finally:
        if lock is not None:
            lock.close()


def _train(cfg: TrainConfig) -> dict:
    resume = _resume_arg(cfg)
    model, tokenizer, task = prepare(cfg, resume)
    metric = task.metric_for_best if task.metric_for_best == "loss" else _metric_key(task, task.metric_for_best)
    args = training_arguments(cfg, task.kind, metric, task.greater_is_better, bool(task.evals))
    callbacks = [EarlyStoppingCallback(cfg.patience)] if cfg.patience else []
    if cfg.early_stopping == "ntk":
        callbacks.append(_ntk_callback(cfg, model, task))
    eval_sets = task.evals if len(task.evals) > 1 else next(iter(task.evals.values()), None)
    settings = {"config": cfg.to_dict(), "learning_rates": {g["name"]: g["lr"] for g in
                                                            param_groups(model, learning_rates(cfg))}}
    trainer = QkvTrainer(model=model, args=args, train_dataset=task.train, eval_dataset=eval_sets,
                         data_collator=task.collator, compute_metrics=task.compute_metrics,
                         callbacks=callbacks, rates=learning_rates(cfg), settings=settings,
                         on_nonfinite=cfg.on_nonfinite, max_nonfinite_skips=cfg.max_nonfinite_skips)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = evaluate_all(trainer, model, tokenizer, task, cfg)
    metrics.update({"train_loss": result.training_loss, "global_step": result.global_step,
                    "trainable_parameters": attach.trainable_parameters(model)[0]})
    if trainer.is_world_process_zero():
        io.save_adapter(model, cfg.output_dir, extra=settings)
        save_config(cfg, os.path.join(cfg.output_dir, "config.yaml"))
        io.write_json(os.path.join(cfg.output_dir, "metrics.json"), metrics)
        plot_losses(trainer.state.log_history, os.path.join(cfg.output_dir, "loss.png"))
    return metrics


def load_run(run_dir: str, overrides: dict | None = None):
    """(config, model with the run's adapter, tokenizer, task) for evaluating or exporting a finished run."""
    from .config import build_config, load_config
    from .data import load_task

    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    if overrides:
        cfg = build_config({**cfg.to_dict(), **overrides})
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    task = load_task(cfg.task, tokenizer, data_dir=cfg.data_dir, max_length=cfg.max_length,
                     max_train_samples=1, max_eval_samples=cfg.max_eval_samples, seed=cfg.seed)
    model, tokenizer, _ = load_model(cfg.model, task.kind, max(task.num_labels, 1), cfg.dtype,
                                     cfg.trust_remote_code, tokenizer, cfg.allow_pickle)
    io.load_adapter(model, run_dir)
    return cfg, model, tokenizer, task


def evaluate_run(run_dir: str, overrides: dict | None = None) -> dict:
    cfg, model, tokenizer, task = load_run(run_dir, overrides)
    args = training_arguments(cfg, task.kind, "loss", False, has_eval=False)  # evaluate() only, no loop
    trainer = Trainer(model=model, args=args, data_collator=task.collator, compute_metrics=task.compute_metrics)
    return evaluate_all(trainer, model, tokenizer, task, cfg)


def dump_metrics(metrics: dict) -> str:
    return json.dumps(metrics, indent=2, sort_keys=True)
