"""DoRA (Liu et al. 2024): W' = m ⊙ V/‖V‖ with V = W₀ + s·B·A, the norm per output row.

m starts at the row norms of W₀, so W' = W₀ at start. As in the paper and PEFT, ‖V‖ is treated as a
constant in backward. The slice output becomes (m/‖V‖)·(x W₀ᵀ + s·x AᵀBᵀ), so the added term is
(m/‖V‖ − 1)·base + (m/‖V‖)·lora, which needs the slice's base output (without bias).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LoRA


class DoRA(LoRA):
    method = "dora"
    peft_variant = {"use_dora": True}
    needs_base_out = True

    def __init__(self, target, base_weight, rank=8, alpha=16.0, rslora=False, dropout=0.0):
        super().__init__(target, base_weight, rank, alpha, rslora, dropout)
        norms = base_weight.detach().to(self.lora_A.dtype).norm(dim=1)
        self.magnitude = nn.Parameter(norms.clone())

    @classmethod
    def parameter_count(cls, cfg, rows, in_features):
        return cfg.rank * (rows + in_features) + rows  # and the magnitude

    def low_rank(self):
        return None  # m/‖W₀ + s·B·A‖ rescales the base's rows too: not a plain LoRA

    def _norm(self, base_weight: torch.Tensor) -> torch.Tensor:
        w = base_weight.to(self.lora_A.dtype) + (self.lora_B @ self.lora_A).detach() * self.scale
        return w.norm(dim=1).detach()

    def forward(self, x, base_out=None, base_weight=None):
        factor = self.magnitude / self._norm(base_weight)
        if self.dropout is not None and self.training:
            # PEFT recomputes the base term on the dropped-out input in this case
            x = self.dropout(x)
            base_out = F.linear(x.to(base_weight.dtype), base_weight)
            h = F.linear(x.to(self.lora_A.dtype), self.lora_A) * self.scale
            lora = F.linear(h, self.lora_B)
        else:
            lora = super()._lora(x)
        return (factor - 1) * base_out.to(factor.dtype) + factor * lora

    def delta_weight(self, base_weight):
        w0 = base_weight.to(self.lora_A.dtype)
        v = w0 + (self.lora_B @ self.lora_A) * self.scale
        return (self.magnitude / v.norm(dim=1))[:, None] * v - w0

    def param_roles(self):
        yield from super().param_roles()
        yield "magnitude", self.magnitude, False

    @classmethod
    def _peft_extra(cls, deltas, weight_rows, tensors):
        d0 = deltas[0]
        if len(deltas) == 1 and d0.target.rows.covers(d0.target.out_features):
            return {**tensors, "lora_magnitude_vector": d0.magnitude}
        m = weight_rows.detach().to(d0.lora_A.dtype).norm(dim=1)  # untouched rows keep W₀ exactly
        for d in deltas:
            m[d.target.rows.index(m.device)] = d.magnitude
        return {**tensors, "lora_magnitude_vector": m}

    @classmethod
    def from_peft(cls, tensors, target):
        if "lora_magnitude_vector" not in tensors:
            raise KeyError("lora_magnitude_vector")
        return {**super().from_peft(tensors, target),
                "magnitude": tensors["lora_magnitude_vector"][target.rows.index()]}
