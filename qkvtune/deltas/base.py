"""The Delta contract: a trainable update ΔW on one slice of one projection.

A delta sees the projection's input ``x`` (and, when it asks for it, the slice's base output without
bias) and returns the term added to that slice's output. It can also materialise ΔW itself, which is
what merging, task vectors and analysis use. Every method (LoRA, DoRA, dense, block-sparse) is one
subclass; nothing else in qkvtune needs to know which.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..targets import Target


class Delta(nn.Module):
    """Base class. ``target`` says which slice; ``kind`` (q, k, v, o, …) drives learning rates."""

    method: str = "delta"
    needs_base_out: bool = False  # DoRA rescales the slice's base output

    def __init__(self, target: Target):
        super().__init__()
        self.target = target

    @property
    def kind(self) -> str:
        return self.target.kind

    def forward(self, x: torch.Tensor, base_out: torch.Tensor | None = None,
                base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """The term added to the slice's output, shape (..., rows)."""
        raise NotImplementedError

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW of the slice, (rows, in) in Linear orientation; ``base_weight`` is the frozen slice W₀."""
        raise NotImplementedError

    def param_roles(self) -> Iterator[tuple[str, nn.Parameter, bool]]:
        """(role, parameter, takes weight decay) for each trainable tensor: optimizer groups use this."""
        raise NotImplementedError

    def hyperparameters(self) -> dict:
        """What is needed to rebuild this delta (saved with the adapter)."""
        return {}

    def extra_repr(self) -> str:
        return f"{self.target.module}[{self.kind}] rows={self.target.rows}"


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on half-precision bases (as PEFT does); otherwise in the base dtype."""
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype
