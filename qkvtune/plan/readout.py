"""What the kernel reads and how a task is scored (``Readout``: a classifier's margin or logits, a causal LM's
label words or its own tokens), the per-kind kernels of every linear slice and the head (``Kinds``), and each
candidate's rates on them."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, TrainConfig
from ..deltas import delta_class
from ..optim import lr_for_head, update_rule
from .candidates import Candidate

HEAD = "head"
AUTO_SKETCH_BYTES = 6 * 2**30  # above this much stored gradient, sketch (analysis.ntk) ...
AUTO_SKETCH_DIM = 4096         # ... to this many coordinates per slice


# --- what the kernel reads, and how a task is scored ---------------------------------------------------------

@dataclass
class Readout:
    """The points the kernel is computed on and how the model is read there: ``output`` (``margin``, ``logits``
    or a callable), the run's ``loss`` in those outputs (``kernel_sim.loss_terms``), the task's main ``metric``,
    the heads in the kernel, and for the minibatch gradient which example each training point belongs to and how
    many points of an example one loss averages (``per_group``: tokens per example for a language model)."""

    train: list
    val: list
    output: object
    loss: str
    metric: str
    what: str
    heads: list = field(default_factory=list)
    label_ids: list | None = None
    collator: object = None
    groups: torch.Tensor | None = None
    per_group: float = 1.0


def kernel_examples(run, n: int, m: int, label_words: str | None = None, tokens: int = 4, log=print) -> Readout:
    """The kernel's points and readout for the run's task: a classifier's head output (the head in the kernel), a
    causal LM's label words (``label_words``), or a causal LM's own token loss: ``n`` training and ``m``
    validation tokens drawn from ⌈n/tokens⌉ and ⌈m/tokens⌉ examples (``ntk.token_examples``)."""
    from ..analysis.ntk import KeepLogits, label_word_examples, token_examples, token_margin
    from ..data.families import main_metric

    info, cfg = run.info, run.cfg
    metric = main_metric(cfg.task)
    if info.sequence_classifier:
        if label_words:
            raise ConfigError(f"--label-words: only for causal LM tasks; {cfg.task} has a {info.kind} head")
        train, val = run.examples("train", n), run.examples("eval", m)
        loss = "mse" if info.regression else "binary_ce" if run.kernel_output == "margin" else "ce"
        heads = list(run.heads) if lr_for_head(cfg) else []
        return Readout(train, val, run.kernel_output, loss, metric, f"the classifier's {run.kernel_output}"
                       + (" (its head in the kernel)" if heads else " (its head kept fixed: lr_head 0)"),
                       heads=heads, collator=run.task.collator)
    if not info.causal_lm:
        raise ConfigError(f"task: plan needs a classifier, a regressor or a causal LM, not {info.kind}")
    if info.preference or info.rewarded:  # no one-output kernel readout of DPO's pairs or GRPO's sampled rewards
        raise ConfigError("task: plan simulates a model's own loss on its outputs; DPO's pairwise loss against the "
                          "pretrained model and GRPO's rewards of sampled answers are not in its kernel view")
    if label_words:
        if cfg.train_on_inputs:
            raise ConfigError("train_on_inputs: the label-word output needs the prompt/response boundary; set it false")
        ids = run.label_token_ids(label_words)
        if len(set(ids)) < len(ids):
            raise ConfigError(f"--label-words: {label_words!r} start with the same token; use words that differ there")
        (train, dropped), (val, dropped_val) = (label_word_examples(run.examples("train", n), ids),
                                                label_word_examples(run.examples("eval", m), ids))
        if dropped or dropped_val:
            log(f"plan: {dropped} training and {dropped_val} validation examples have no label word in their "
                f"response; left out")
        if len(train) < 2:
            raise ConfigError(f"--label-words: {len(train)} training responses of {cfg.task} contain one of "
                              f"{label_words!r} (as a word after a space)")
        output = "margin" if len(ids) == 2 else "logits"
        return Readout(train, val, output, "binary_ce" if output == "margin" else "ce", "accuracy",
                       f"the label words' {output} ({label_words}) at the end of the prompt", label_ids=ids,
                       collator=run.task.collator)
    if info.scored_by_generation:
        raise ConfigError(f"--label-words: {cfg.task} is scored by generated answers; name the words the kernel "
                          "reads, e.g. --label-words false,true")
    tokens = max(1, int(tokens))
    examples = run.examples("train", math.ceil(n / tokens))
    val_examples = run.examples("eval", math.ceil(m / tokens))
    train, groups = token_examples(examples, n, cfg.seed)
    val, _ = token_examples(val_examples, m, cfg.seed + 1)
    trained = [sum(1 for j, lab in enumerate(ex["labels"]) if j > 0 and lab != -100) for ex in examples]
    return Readout(train, val, token_margin, "token", "loss",
                   f"{len(train)} trained tokens of {len(examples)} examples (their loss: softplus of the token's "
                   f"margin against the vocabulary)", collator=KeepLogits(run.task.collator),
                   groups=torch.tensor(groups), per_group=sum(trained) / len(trained))


def targets_of(labels: torch.Tensor | None, readout: Readout) -> torch.Tensor | None:
    """What the loss is computed against: classes, scores; none for a language model's own tokens."""
    if readout.loss == "token" or labels is None:
        return None
    return labels.double() if labels.is_floating_point() else labels.long()


def metric_of(metric: str, loss: str, outputs: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """The task's main metric of predicted outputs (R, m, C), one value per recorded step (R,): accuracy of the
    margin's sign or the argmax, F1 / MCC of those classes, Pearson of a score; ``loss`` the mean loss."""
    import numpy as np

    from ..analysis.kernel_sim import loss_terms
    from ..data.metrics import PER_EXAMPLE

    if metric == "loss":
        return loss_terms(loss, outputs, labels)[0].mean(-1)
    if loss == "mse":
        preds = outputs[..., 0]
    else:
        preds = (outputs[..., 0] > 0).long() if outputs.shape[-1] == 1 else outputs.argmax(-1)
    if metric == "accuracy":
        return (preds == labels[None]).double().mean(1)
    fn = PER_EXAMPLE.get(metric)
    if fn is None:
        return (preds == labels[None]).double().mean(1)
    y = np.asarray(labels)
    return torch.tensor([fn(y, np.asarray(p)) for p in preds], dtype=torch.float64)


def better(metric: str):
    """key(score) that sorts best first."""
    from ..data.metrics import greater_is_better

    return (lambda v: -v) if greater_is_better(metric) else (lambda v: v)


def default_goal(metric: str, baseline: float) -> float:
    """What counts as learning the task: clearly beating the constant predictor (5 points of accuracy or F1, 0.2
    of a correlation), or for a language model's loss 2 % under the pretrained model's."""
    if metric == "loss":
        return baseline * 0.98
    return baseline + (0.2 if metric in ("pearson", "spearmanr", "matthews_correlation") else 0.05)


def reaches(metric: str, value: float, goal: float) -> bool:
    from ..data.metrics import greater_is_better

    return value >= goal if greater_is_better(metric) else value <= goal


# --- kernels ------------------------------------------------------------------------------------------------

def kernels(run, data: list, *, output, label_token_ids=None, heads=None, collator=None, sketch_dim: int | None = None,
            sketch: str = "kron", chunk_size: int = 16, log=print):
    """The eNTK of every slice of the run's targets (and ``heads`` whole) on ``data``, sketched
    (``AUTO_SKETCH_DIM``) when the per-example gradients would pass ``AUTO_SKETCH_BYTES``: what a plan costs, and
    what ``bench plan --cost-ns`` times. Returns the ``NTKResult`` and the sketch dimension used."""
    from ..analysis.ntk import empirical_ntk

    stored = len(data) * sum(t.shape[0] * t.shape[1] for t in run.targets) * 4
    if sketch_dim is None and stored > AUTO_SKETCH_BYTES:
        sketch_dim = AUTO_SKETCH_DIM
        log(f"plan: {stored / 2**30:.1f} GiB of per-example gradients: sketched to {sketch_dim} coordinates a slice")
    return empirical_ntk(run.model, data, run.targets, collator=collator or run.task.collator, output=output,
                         label_token_ids=label_token_ids, heads=heads, sketch_dim=sketch_dim, sketch=sketch,
                         chunk_size=chunk_size, seed=run.cfg.seed), sketch_dim


@dataclass
class Kinds:
    """The kinds' kernels one unit of each kind's rate moves the outputs by under the configured method and
    optimizer (``unit``: K × (n+m) × (n+m), in the order of ``names``; a task head is the kind ``head``), and how
    each grows as training moves the method's parameters (``growth``: γ, with ``power`` p: the weight
    1 + γ·(κ·Σ η)ᵖ, κ measured by the calibration run)."""

    names: list[str]
    unit: torch.Tensor
    growth: torch.Tensor
    power: int
    detail: dict

    def index(self, kind: str) -> int:
        return self.names.index(kind)

    def subset(self, idx: torch.Tensor) -> "Kinds":
        return Kinds(self.names, self.unit[:, idx][:, :, idx], self.growth, self.power, self.detail)


def unit_kernels(res, run, readout: Readout, y, n: int) -> Kinds:
    """Per kind (and ``head``): Σ over the kind's slices of w·K_slice, with w = the method's factor c (SGD) or
    √(c·P/E‖ḡ‖²) (Adam, ``kernel_sim.adam_weight``) — a head is dense (c = 1, every entry moving) — and the
    kind's growth (``Delta.kernel_growth``, averaged over its slices)."""
    from ..analysis.kernel_sim import adam_weight, loss_terms, minibatch_gradient_norm2

    cfg = run.cfg
    method = delta_class(cfg.method)
    rule, _ = update_rule(cfg)
    outputs = res.per_output.shape[0] if res.per_output is not None else 1
    _, dloss, _ = loss_terms(readout.loss, res.f0[:n], y)
    batch = cfg.batch_size * cfg.grad_accum
    shapes = {t.name: (t.kind, t.rows.size, t.in_features) for t in run.targets}
    per_kind: dict[str, torch.Tensor] = {}
    growth: dict[str, list[float]] = {}
    power = 1
    detail = {}
    for name, k in res.per_target.items():
        k = k / outputs  # the kernel of one output (the outputs' kernels averaged)
        if name in shapes:
            kind, rows, fin = shapes[name]
            factor, moving = method.kernel_factor(cfg, rows, fin)
            gamma, power = method.kernel_growth(cfg, rows, fin, rule)
        else:  # a head's linear layer: trained whole, a kernel that does not grow
            kind, factor, moving, gamma = HEAD, 1.0, int(res.meta["sizes"][name]), 0.0
        g2 = minibatch_gradient_norm2(k, dloss, batch, readout.groups, readout.per_group) if rule == "adam" else 0.0
        w = adam_weight(factor, moving, g2) if rule == "adam" else factor
        detail[name] = {"kind": kind, "factor": factor, "moving": moving, "gradient_norm2": g2, "weight": w,
                        "growth": gamma}
        per_kind[kind] = per_kind.get(kind, 0) + w * k
        growth.setdefault(kind, []).append(gamma)
    names = sorted(per_kind)
    return Kinds(names, torch.stack([per_kind[k] for k in names]),
                 torch.tensor([sum(growth[k]) / len(growth[k]) for k in names], dtype=torch.float64), power, detail)


def kind_rates(kinds: Kinds, cand: "Candidate", cfg: TrainConfig, lr: float) -> torch.Tensor:
    """(K,) each kind's rate at η_Q = ``lr`` for this candidate (``optim.lr_for_kind``; the head at its rate;
    0 for kinds it does not tune)."""
    have = [k for k in kinds.names if k != HEAD]
    rates = cand.rates(have, lr, cfg.lr_mlp_ratio)
    if HEAD in kinds.names:
        rates[HEAD] = lr_for_head(dataclasses.replace(cfg, lr=lr))
    return torch.tensor([rates.get(k, 0.0) for k in kinds.names], dtype=torch.float64)


def step_weights(kinds: Kinds, rates: torch.Tensor, shape: torch.Tensor, scale: float, kappa: float) -> torch.Tensor:
    """(…, K, T) each kind's step in kernel time at every step: s·η_k(t)·(1 + γ_k·(κ·Σ_{τ<t} η_k(τ))ᵖ) for rates
    (…, K) and the schedule's shape (T,) (its rate relative to the peak)."""
    eta = rates[..., :, None] * shape  # (…, K, T)
    before = torch.cumsum(eta, -1) - eta
    return scale * eta * (1 + kinds.growth[:, None] * (kappa * before) ** kinds.power)


