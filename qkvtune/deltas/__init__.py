"""Parametrizations of ΔW on a slice. ``METHODS`` is the one place that maps a method name to its class."""

from .base import Delta
from .blocksparse import BlockSparse
from .dense import Dense
from .dora import DoRA
from .lora import LoRA, lora_scale

METHODS: dict[str, type[Delta]] = {"lora": LoRA, "dora": DoRA, "dense": Dense, "smt": BlockSparse}


def delta_class(method: str) -> type[Delta]:
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {', '.join(METHODS)}")
    return METHODS[method]


def peft_class(config: dict) -> type[Delta]:
    """The class of a PEFT adapter_config.json's adapter: its peft_type and variant flags (use_dora)."""
    for cls in METHODS.values():
        if cls.peft_type == config.get("peft_type") and all(
                bool(config.get(k)) == v for k, v in cls.peft_variant.items()):
            return cls
    raise ValueError(f"peft_type {config.get('peft_type')!r} is not supported (only LORA)")


def parameter_count(method: str, cfg, targets) -> int:
    """Trainable parameters of ``method``'s deltas (with ``cfg``'s hyperparameters) on ``targets``, task heads
    aside: the one adapter size, by each method's own ``Delta.parameter_count``."""
    cls = delta_class(method)
    return sum(cls.parameter_count(cfg, t.rows.size, t.in_features) for t in targets)


def build_delta(method: str, target, base_weight, **hparams) -> Delta:
    """One delta of ``method`` on ``target``; ``hparams`` are its ``hyperparameters()`` (keys another
    method would take, such as dense given a rank, are not this method's and are left out)."""
    cls = delta_class(method)
    return cls(target, base_weight, **{k: v for k, v in hparams.items() if k in cls.hparam_keys})


__all__ = ["Delta", "LoRA", "DoRA", "Dense", "BlockSparse", "METHODS", "build_delta", "delta_class", "peft_class",
           "lora_scale", "parameter_count"]
