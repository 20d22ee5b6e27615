"""``QkvTrainer``: ``transformers.Trainer`` with our parameter groups in and our adapter files out, for any
objective (the task's own loss; DPO through TRL's trainer, ``dpo.py``).

Trainer does the loop, gradient accumulation, evaluation, best-checkpoint selection, resume, logging and
multi-process training (torchrun / accelerate launch). ``QkvTraining`` changes only what is ours: the optimizer's
groups (per matrix kind), non-finite losses and gradients, and checkpoints, which hold the adapter (qkvtune + PEFT
layout) instead of the whole model.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import save_fsdp_optimizer
from transformers import Trainer, TrainingArguments
from transformers.trainer import SCHEDULER_NAME

from . import checkpoints, chunked_loss, io, sharding
from .config import TrainConfig
from .errors import QkvtuneError
from .models import default_dtype
from .optim import param_groups
from .task import TaskInfo, is_causal_lm


class NonFiniteError(QkvtuneError):
    """A non-finite loss or gradient; the message names the step and the last good checkpoint."""


@contextlib.contextmanager
def adapters_attached(model):
    """Trainer refuses a quantized model unless transformers' own PEFT integration says adapters are attached;
    qkvtune's are, in its wrappers: say so for the duration of Trainer's check only."""
    flagged = getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False)
    if flagged:
        model._hf_peft_config_loaded = True
    try:
        yield
    finally:
        if flagged:
            del model._hf_peft_config_loaded


class QkvTraining:
    """What qkvtune adds to a Trainer class (mixed in before it: ``QkvTrainer``, ``dpo.QkvDPOTrainer``)."""

    def __init__(self, *args, rates, settings: dict | None = None, on_nonfinite: str = "stop",
                 max_nonfinite_skips: int = 10, lm_loss: chunked_loss.ChunkedLoss | None = None, **kwargs):
        self.rates = rates
        self.lm_loss = lm_loss  # chunked_loss: the model's loss without its full logits (chunked_loss.py)
        self.settings = settings or {}
        self.on_nonfinite, self.max_nonfinite_skips, self.nonfinite_skips = on_nonfinite, max_nonfinite_skips, 0
        with adapters_attached(kwargs.get("model")):
            super().__init__(*args, **kwargs)
        # Trainer assumes a forward(**kwargs) normalises its loss by num_items_in_batch and then multiplies
        # the loss by the number of processes; sequence classifiers ignore that kwarg, so under DDP their
        # gradients came out world_size times too large. Only causal LMs really use it.
        if not is_causal_lm(self.model):
            self.model_accepts_loss_kwargs = False

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        if self.args.fsdp and not self.is_fsdp_enabled:
            sharding.fsdp_on_cpu(self.accelerator, self.args.fsdp_plugin_args)
            self.is_fsdp_enabled = True

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

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # chunked only where nobody reads the logits: training, and evaluation that keeps the loss alone
        chunked = self.lm_loss is not None and (not return_outputs or self.args.prediction_loss_only)
        with self.lm_loss.active(chunked) if self.lm_loss is not None else contextlib.nullcontext():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        rows = self.args.per_device_train_batch_size
        labels = inputs.get("labels")
        if self.lm_loss is None or not prediction_loss_only or labels is None or len(labels) <= rows:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        # The loss alone, its forward in slices of a training batch's rows: evaluation (64 rows by default) then
        # holds no more activations than a training step. Each slice's summed loss over the whole batch's count
        # of labelled tokens, added up, is the batch's loss as Trainer computes it.
        inputs = self._prepare_inputs(inputs)
        count = (inputs["labels"][..., 1:] != -100).sum()
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        loss = 0.0
        with torch.no_grad(), self.compute_loss_context_manager():
            for s in range(0, len(labels), rows):
                part = {k: v[s:s + rows] if torch.is_tensor(v) and v.dim() and len(v) == len(labels) else v
                        for k, v in inputs.items()}
                loss = loss + self.compute_loss(model, part, num_items_in_batch=count)
        return loss.detach(), None, None

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.on_nonfinite == "stop" and not torch.isfinite(loss).all():
            self._nonfinite("loss")
        return loss

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        saved = os.path.join(checkpoint or "", "optimizer.bin")  # accelerate's name for FSDP's full optimizer state
        if self.is_fsdp_enabled and os.path.isfile(saved) and not torch.load(saved, weights_only=True).get("state"):
            # an optimizer that keeps no state (plain SGD): torch cannot load an empty one under FSDP; only the
            # schedule resumes, and with it each group's current rate (the optimizer's state would have held it)
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True))
            for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
                group["lr"] = lr
            return
        super()._load_optimizer_and_scheduler(checkpoint)

    # --- checkpoints: complete only once sealed (see checkpoints.py) ---
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            checkpoints.seal(os.path.join(self._get_output_dir(trial), f"checkpoint-{self.state.global_step}"))

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            io.save_adapter(self.model, output_dir or self.args.output_dir, extra=self.settings)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self.is_fsdp_enabled:
            return super().save_model(output_dir, _internal_call)
        with sharding.gathered(self.model):  # every rank takes part; rank 0 writes the adapter
            self._save(output_dir)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_fsdp_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # Trainer would also write FSDP's copy of the whole model; the adapter (save_model) is all that trains
        save_fsdp_optimizer(self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.model, output_dir)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        io.restore_adapter(model or self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        io.restore_adapter(self.model, self.state.best_model_checkpoint)


class QkvTrainer(QkvTraining, Trainer):
    """Trainer on the task's own loss."""


def trl_arguments(cls, args: TrainingArguments, **own):
    """``args`` (``training_arguments``) as TRL's config class ``cls`` (a TrainingArguments subclass), with the
    objective's own keys ``own`` set."""
    fields = cls.__dataclass_fields__
    kept = {k: v for k, v in args.to_dict().items() if k in fields and fields[k].init and not k.startswith("_")}
    return cls(**{**kept, **own})


def training_arguments(cfg: TrainConfig, task: TaskInfo, metric: str, greater: bool, has_eval: bool,
                       layers: list[str] = ()) -> TrainingArguments:
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
        report_to=[] if cfg.report_to == "none" else [n.strip() for n in cfg.report_to.split(",")],
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=dtype == torch.bfloat16 and torch.cuda.is_available(),
        fp16=dtype == torch.float16,  # a gradient scaler (CUDA only: refused elsewhere in _train)
        prediction_loss_only=task.causal_lm,  # never gather LM logits
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=False,
        ddp_find_unused_parameters=False,
        **sharding.trainer_arguments(cfg.fsdp, cfg.fsdp_min_params, layers),
    )
