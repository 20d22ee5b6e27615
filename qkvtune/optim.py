"""Optimizer parameter groups by matrix kind (arXiv 2410.02247: η_V = λ·η_Q; the MLP's kinds at lr_mlp_ratio·η_Q).

Groups come from the delta objects themselves — each delta knows its slice's kind (q, k, v, o, …) and
the role of each tensor (LoRA A/B, DoRA magnitude, dense ΔW) — never from substrings of parameter names.
Weight decay goes to matrices (A, B, ΔW, head weights), never to magnitudes, biases or norms.
"""

from __future__ import annotations

from torch import nn

from . import attach
from .config import TrainConfig
from .targets import MATRIX_KINDS, MLP_KINDS


def lr_for_kind(rates: TrainConfig, kind: str) -> float:
    """η of a matrix kind: its explicit ``lr_<kind>``, else λ·lr for v, lr_mlp_ratio·lr for gate, up and down, else
    lr (also for the other modules all-linear takes whole, such as BERT's pooler)."""
    explicit = getattr(rates, f"lr_{kind}", None) if kind in MATRIX_KINDS else None  # a module named "ratio" is no rate
    if explicit is not None:
        return explicit
    if kind == "v":
        return rates.lr * rates.lr_ratio
    return rates.lr * rates.lr_mlp_ratio if kind in MLP_KINDS else rates.lr


def lr_for_head(rates: TrainConfig) -> float:
    """η of the task head: ``lr_head``, else lr (0 keeps a fresh head fixed)."""
    return rates.lr_head if rates.lr_head is not None else rates.lr


def update_rule(rates: TrainConfig) -> tuple[str, float]:
    """How the configured optimizer turns gradients into steps, for the kernel's simulation: ("adam", β₁) for the
    Adam family (each parameter's step divided by its gradient's root mean square, the gradients averaged with
    β₁ = 0.9, transformers' default), ("sgd", 0) for plain SGD; anything else is read as Adam (sign-like,
    normalised steps), the closer of the two for adaptive optimizers."""
    name = rates.optim.lower()
    if name.startswith("sgd"):
        return "sgd", 0.0
    return "adam", 0.9


def param_groups(model: nn.Module, rates: TrainConfig, adapter: str | None = None) -> list[dict]:
    """Groups named ``<kind>.<role>`` (e.g. ``v.B``) and ``head``/``head.no_decay``, each with its lr and
    weight decay, from the config's rate keys (lr, lr_ratio, lr_mlp_ratio, lr_q/k/v/o, lr_head, loraplus_ratio,
    weight_decay). Every trainable parameter of the model must land in exactly one group."""
    groups: dict[str, dict] = {}

    def put(name: str, p: nn.Parameter, lr: float, decay: bool) -> None:
        g = groups.setdefault(name, {"name": name, "params": [], "lr": lr,
                                     "weight_decay": rates.weight_decay if decay else 0.0})
        g["params"].append(p)

    for _, delta in attach.iter_deltas(model, adapter):
        lr = lr_for_kind(rates, delta.kind)
        for role, p, decay in delta.param_roles():
            if p.requires_grad:
                role_lr = lr * rates.loraplus_ratio if (role == "B" and rates.loraplus_ratio) else lr
                put(f"{delta.kind}.{role}", p, role_lr, decay)
    head_lr = lr_for_head(rates)
    for _, head in attach.head_modules(model, adapter).items():
        for _, p in head.named_parameters():
            if p.requires_grad:
                decay = p.ndim >= 2  # not biases or LayerNorm scales
                put("head" if decay else "head.no_decay", p, head_lr, decay)
    grouped = {id(p) for g in groups.values() for p in g["params"]}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in grouped]
    if stray:
        raise ValueError(f"trainable parameters outside any adapter or head: {stray[:3]}")
    return list(groups.values())
