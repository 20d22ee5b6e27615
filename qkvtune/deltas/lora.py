"""LoRA (Hu et al. 2021): ΔW = s·B·A with A ∈ R^{r×in} random, B ∈ R^{out×r} zero, s = α/r (rsLoRA: α/√r).

Forward adds s·(dropout(x) Aᵀ) Bᵀ; the scale is applied on the r-wide intermediate (cheapest place), and
dropout costs nothing when p = 0. Initialisation and tensor shapes follow PEFT so adapters interchange.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import Target
from .base import Delta, adapter_dtype


def lora_scale(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRA(Delta):
    method = "lora"

    def __init__(self, target: Target, base_weight: torch.Tensor, rank: int = 8, alpha: float = 16.0,
                 rslora: bool = False, dropout: float = 0.0):
        super().__init__(target)
        out, fin = target.shape
        if not 0 < rank <= min(out, fin):
            raise ValueError(f"rank: {rank} must be in 1..{min(out, fin)} for {target.module}[{target.kind}] ({out}×{fin})")
        dtype, device = adapter_dtype(base_weight), base_weight.device
        self.rank, self.alpha, self.rslora, self.dropout_p = rank, float(alpha), bool(rslora), float(dropout)
        self.scale = lora_scale(rank, alpha, rslora)
        self.lora_A = nn.Parameter(torch.empty(rank, fin, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out, rank, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _lora(self, x: torch.Tensor) -> torch.Tensor:
        if self.dropout is not None:
            x = self.dropout(x)
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)  # fp32 adapter on a half-precision base; autocast casts by itself
        h = F.linear(x, self.lora_A) * self.scale
        return F.linear(h, self.lora_B)

    def forward(self, x, base_out=None, base_weight=None):
        return self._lora(x)

    def delta_weight(self, base_weight=None):
        return (self.lora_B @ self.lora_A) * self.scale

    def param_roles(self):
        yield "A", self.lora_A, True
        yield "B", self.lora_B, True

    def hyperparameters(self):
        return {"rank": self.rank, "alpha": self.alpha, "rslora": self.rslora, "dropout": self.dropout_p}
