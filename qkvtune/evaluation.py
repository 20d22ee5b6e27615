"""Scoring a model on its task: the final metrics of a run (through Trainer's evaluation loop, GLUE names),
and the same task metrics computed directly for analyses that change the weights between scores
(task vectors, the claims suite)."""

from __future__ import annotations

import math

import torch
from transformers import EvalPrediction, Trainer

from .data.metrics import token_loss_of
from .inference import batches, forward


def metric_key(task, name: str) -> str:
    """The key Trainer reports ``name`` under: eval_<name>, or eval_<set>_<name> with several dev sets."""
    return name if len(task.evals) <= 1 else f"{next(iter(task.evals))}_{name}"


def evaluate_all(trainer: Trainer, model, tokenizer, task, cfg, predictions: dict | None = None,
                 adapter: str | None = None) -> dict:
    """Final metrics with GLUE names (eval_accuracy, eval_matthews_correlation, eval_pearson, …): ``eval_*`` on
    the validation split, ``test_*`` on the test split (``val_size``). ``predictions``, when given, receives
    each test split's per-example labels and predictions (class ids, scores or extracted answers; for a
    language-model loss, each example's trained-token count as its label and its summed next-token loss as its
    prediction: the split's ``test_loss`` is their token-weighted mean, ``data.metrics.token_loss_of``)."""
    if task.preference or task.rewarded:  # TRL's records: every split scored by the objective's own metrics
        sets = {("eval" if len(task.evals) == 1 else f"eval_{n}"): ds for n, ds in task.evals.items()}
        sets.update({("test" if len(task.tests) == 1 else f"test_{n}"): ds for n, ds in task.tests.items()})
        if task.rewarded:  # the mean reward of greedy answers
            from .grpo import reward_metrics

            return reward_metrics(model, tokenizer, sets, cfg)
        from .dpo import preference_metrics  # TRL's DPO metrics, each against the pretrained model (``adapter`` off)

        metrics = preference_metrics(model, tokenizer, trainer.args, sets, adapter, cfg)
        return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    metrics = {}
    if len(task.evals) == 1:
        metrics.update(trainer.evaluate(next(iter(task.evals.values()))))
    elif task.evals:
        for name, ds in task.evals.items():
            metrics.update(trainer.evaluate(ds, metric_key_prefix=f"eval_{name}"))
    for name, ds in task.tests.items():
        prefix = "test" if len(task.tests) == 1 else f"test_{name}"
        if task.causal_lm and not task.scored_by_generation:  # a language-model loss, per example
            nll, tokens = token_losses(model, [ds[i] for i in range(len(ds))], task.collator, cfg.eval_batch_size)
            metrics[f"{prefix}_loss"] = token_loss_of(tokens, nll)
            metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_loss"], 50.0))
            if predictions is not None:
                predictions[name] = {"labels": tokens, "predictions": nll}
            continue
        out = trainer.predict(ds, metric_key_prefix=prefix)
        metrics.update(out.metrics)
        if predictions is not None and out.label_ids is not None and task.sequence_classifier:
            preds = out.predictions[0] if isinstance(out.predictions, (tuple, list)) else out.predictions
            preds = preds.reshape(len(preds), -1)
            preds = preds[:, 0] if task.regression else preds.argmax(-1)
            predictions[name] = {"labels": out.label_ids.reshape(-1).tolist(), "predictions": preds.tolist()}
    if task.causal_lm and not task.scored_by_generation and "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    if task.scored_by_generation and task.generation_records:
        from .data.answers import generation_accuracy

        for name, records in task.generation_records.items():
            result = generation_accuracy(model, tokenizer, records, batch_size=cfg.eval_batch_size,
                                         max_new_tokens=cfg.max_new_tokens, choices=task.answer_choices)
            if name in task.tests:
                prefix = "test" if len(task.tests) == 1 else f"test_{name}"
                if predictions is not None:
                    predictions[name] = {"labels": [r["answer"] for r in records], "predictions": result["predictions"]}
            else:
                evals = [n for n in task.generation_records if n not in task.tests]
                prefix = "eval" if len(evals) == 1 else f"eval_{name}"
            metrics[f"{prefix}_accuracy"] = result["accuracy"]
            metrics[f"{prefix}_samples"] = result["n"]
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


def token_losses(model, examples: list[dict], collator, batch_size: int = 8) -> tuple[list[float], list[int]]:
    """A causal LM's loss per example, in eval mode: the summed next-token cross-entropy over its trained tokens
    (labels ≠ −100) and how many there are."""
    import torch.nn.functional as F

    def read(out, batch):
        logits, labels = out.logits[:, :-1].float(), batch["labels"][:, 1:]
        mask = labels != -100
        nll = F.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none") * mask
        return torch.stack([nll.sum(1).double(), mask.sum(1).double()], 1)

    out = forward(model, batches(examples, collator, batch_size), read, labels=True)
    return out[:, 0].tolist(), [int(n) for n in out[:, 1].tolist()]


def predict(model, examples: list[dict], collator, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a sequence classifier on tokenized examples, in eval mode."""
    chunks = batches(examples, collator, batch_size)
    return forward(model, chunks), torch.cat([b["labels"] for b in chunks])


def accuracy(model, examples: list[dict], collator, batch_size: int = 64) -> float:
    """Plain argmax accuracy of a sequence classifier."""
    logits, labels = predict(model, examples, collator, batch_size)
    return float((logits.argmax(-1) == labels).double().mean()) if len(labels) else 0.0


def task_metrics(model, task, examples: list[dict], batch_size: int = 64) -> dict:
    """The task's own metrics (accuracy, Matthews, Pearson …, without the eval_ prefix) of a sequence
    classifier on ``examples``, computed by the task's ``compute_metrics``."""
    logits, labels = predict(model, examples, task.collator, batch_size)
    return task.compute_metrics(EvalPrediction(predictions=logits.numpy(), label_ids=labels.numpy()))
