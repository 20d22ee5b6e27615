"""GRPO on qkvtune's slices, trained by TRL's ``GRPOTrainer`` (generation, group advantages, the loss and its
metrics are TRL's): any method on any targets, each matrix kind at its own rate, generation with the training model
itself (no server; TRL's vLLM mode is for GPUs), the rewards the config names (``rewards.py``).

With a KL term (``grpo_beta`` > 0) the reference is the same model with every delta switched off, as TRL does for
a PEFT model by disabling its adapter — never a second copy (which TRL would load for any other model)."""

from __future__ import annotations

import functools

from . import attach
from .config import TrainConfig
from .rewards import reward_functions
from .trainer import QkvTraining, trl_arguments


@functools.cache
def trainer_class():
    """``QkvGRPOTrainer``: qkvtune's optimizer groups, fault handling and adapter checkpoints on TRL's GRPOTrainer."""
    from trl import GRPOTrainer

    return type("QkvGRPOTrainer", (QkvTraining, GRPOTrainer), {"__doc__": "GRPOTrainer with qkvtune's groups."})


def grpo_arguments(cfg: TrainConfig, args):
    """Trainer's arguments for ``cfg`` as TRL's GRPOConfig: ``batch_size`` counts completions (``grpo_generations``
    of each prompt), ``grpo_completion_length`` caps each, sampled at ``grpo_temperature``; ``grpo_beta`` weighs the KL."""
    from trl import GRPOConfig

    return trl_arguments(GRPOConfig, args, num_generations=cfg.grpo_generations, beta=cfg.grpo_beta,
                         max_completion_length=cfg.grpo_completion_length, temperature=cfg.grpo_temperature,
                         log_completions=False)


class DeltasOff:
    """The reference policy: ``model`` with adapter ``adapter``'s deltas off (its base weights), without gradients."""

    def __init__(self, model, adapter: str):
        self.model, self.adapter = model, adapter

    def __call__(self, *args, **kwargs):
        import torch

        with torch.no_grad(), attach.heads_only(self.model, self.adapter):
            return self.model(*args, **kwargs)


def build_trainer(model, tokenizer, args, train_dataset, eval_dataset, reward, adapter: str | None = None,
                  **kwargs):
    """A QkvGRPOTrainer; for ``args.beta`` > 0 its reference is ``DeltasOff`` (TRL is built with β = 0, so that it
    loads no second model, and given the β and this reference after)."""
    beta = args.beta
    if beta and adapter is None:
        raise ValueError("a KL term needs the adapter whose deltas the reference switches off")
    args.beta = 0.0
    try:
        trainer = trainer_class()(model=model, reward_funcs=reward_functions(reward), args=args,
                                  train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=tokenizer,
                                  **kwargs)
    finally:
        args.beta = beta
    if beta:
        trainer.beta, trainer.ref_model = beta, DeltasOff(model, adapter)
    return trainer


def prompt_ids(tokenizer, prompts: list) -> list[list[int]]:
    """Each prompt as the model sees it: a chat through the template with the assistant's turn opened, or text."""
    out = []
    for p in prompts:
        if isinstance(p, str):
            out.append(tokenizer(p)["input_ids"])
        else:
            ids = tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True)
            out.append(list(ids["input_ids"]) if hasattr(ids, "keys") else list(ids))  # a BatchEncoding or ids
    return out


def reward_metrics(model, tokenizer, datasets: dict, cfg: TrainConfig) -> dict:
    """``<prefix>_reward``: the mean summed reward of the model's greedy answers to each split's prompts (and each
    reward's own mean, ``<prefix>_reward/<name>``)."""
    from .inference import generate

    out = {}
    fns = reward_functions(cfg.reward)
    for prefix, ds in datasets.items():
        rows = [ds[i] for i in range(len(ds))]
        answers = generate(model, tokenizer, prompt_ids(tokenizer, [r["prompt"] for r in rows]),
                           batch_size=cfg.eval_batch_size, max_new_tokens=cfg.grpo_completion_length,
                           desc=f"{prefix} answers")
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"} if rows else {}
        totals = [0.0] * len(rows)
        for fn in fns:
            values = fn([r["prompt"] for r in rows], answers, **columns)
            out[f"{prefix}_reward/{getattr(fn, '__name__', 'reward')}"] = sum(values) / max(len(values), 1)
            totals = [t + v for t, v in zip(totals, values)]
        out[f"{prefix}_reward"] = sum(totals) / max(len(totals), 1)
    return out
