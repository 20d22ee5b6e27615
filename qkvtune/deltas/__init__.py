"""Parametrizations of ΔW on a slice. ``build_delta`` maps a method name to its class."""

from .base import Delta
from .blocksparse import BlockSparse
from .dense import Dense
from .dora import DoRA
from .lora import LoRA, lora_scale

METHODS = {"lora": LoRA, "dora": DoRA, "dense": Dense, "smt": BlockSparse}


def build_delta(method: str, target, base_weight, **hparams) -> Delta:
    """One delta of ``method`` on ``target``; ``hparams`` go to its constructor (dense takes none)."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {sorted(METHODS)}")
    cls = METHODS[method]
    if cls is Dense:
        return Dense(target, base_weight)
    return cls(target, base_weight, **hparams)


__all__ = ["Delta", "LoRA", "DoRA", "Dense", "BlockSparse", "METHODS", "build_delta", "lora_scale"]
