"""DPO on qkvtune's slices, trained by TRL's ``DPOTrainer`` (the loop, the loss and its metrics are TRL's): any
method (LoRA, DoRA, dense ΔW) on any targets, each matrix kind at its own rate, checkpoints and adapters as every
qkvtune run writes them.

The reference model is the same model with every delta switched off, never a second copy: its log-probabilities
of each pair are computed once, before training, with the deltas off (TRL's ``precompute_ref_log_probs``), for
the training pairs and every evaluation split. A fresh adapter is the identity (LoRA's B = 0, DoRA's magnitude =
the base's row norms, a dense ΔW = 0), so this is the reference TRL + PEFT computes by disabling the adapter at
every step — and it stays right when a finished run is evaluated again."""

from __future__ import annotations

import contextlib
import functools

from . import attach
from .config import ConfigError, TrainConfig
from .trainer import QkvTraining, trl_arguments


@functools.cache
def trainer_class():
    """``QkvDPOTrainer``: qkvtune's optimizer groups, fault handling and adapter checkpoints on TRL's DPOTrainer
    (imported when a run needs it: TRL is the ``bench`` extra's, and slow to import)."""
    from trl import DPOTrainer

    return type("QkvDPOTrainer", (QkvTraining, DPOTrainer), {"__doc__": "DPOTrainer with qkvtune's groups."})


def dpo_arguments(cfg: TrainConfig, args):
    """Trainer's arguments for ``cfg`` (``trainer.training_arguments``) as TRL's DPOConfig with DPO's own keys."""
    from trl import DPOConfig

    types = cfg.dpo_loss_type if isinstance(cfg.dpo_loss_type, list) else [cfg.dpo_loss_type]
    known = loss_types()
    unknown = [t for t in types if known and t not in known]
    if unknown:  # TRL itself would say so only at the first training step
        raise ConfigError(f"dpo_loss_type: {', '.join(unknown)} is not one of TRL's ({', '.join(known)})")
    try:
        return trl_arguments(DPOConfig, args, beta=cfg.dpo_beta, loss_type=types, max_length=cfg.max_length,
                             precompute_ref_log_probs=True)
    except ValueError as e:
        raise ConfigError(f"dpo_loss_type: {e}") from None


def loss_types() -> list[str]:
    """The DPO loss types TRL's DPOConfig documents (read off its field's help; [] if it names none)."""
    import re

    from trl import DPOConfig

    text = DPOConfig.__dataclass_fields__["loss_type"].metadata.get("help", "")
    return list(dict.fromkeys(re.findall(r"`'(\w+)'`", text)))


def build_trainer(model, tokenizer, args, train_dataset, eval_dataset, adapter: str | None, **kwargs):
    """A QkvDPOTrainer whose reference log-probabilities were computed with every delta of ``adapter`` off."""
    cls = trainer_class()
    off = attach.heads_only(model, adapter) if adapter else contextlib.nullcontext()
    with off:  # the reference: the pretrained model (precomputed here, in TRL's __init__)
        return cls(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                   processing_class=tokenizer, **kwargs)


def preference_metrics(model, tokenizer, args, datasets: dict, adapter: str | None, rates) -> dict:
    """TRL's DPO metrics (loss, rewards/accuracies, margins, …) on each split of ``datasets`` ({prefix: data}),
    each against the pretrained model."""
    out = {}
    for prefix, ds in datasets.items():  # TRL wants training pairs even to evaluate: one, whose logps are not used
        trainer = build_trainer(model, tokenizer, args, ds.select(range(1)), ds, adapter, rates=rates)
        metrics = trainer.evaluate(metric_key_prefix="eval")  # TRL names its DPO metrics eval_* whatever the prefix
        out.update({prefix + k[len("eval"):]: v for k, v in metrics.items() if k.startswith("eval_")})
    return out
