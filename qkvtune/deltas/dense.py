"""Dense delta: the whole slice is trainable ("full fine-tuning of Q and V only"), stored as ΔW from zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta, adapter_dtype


class Dense(Delta):
    method = "dense"
    rate_family = "dense"

    def __init__(self, target, base_weight: torch.Tensor):
        super().__init__(target)
        self.weight = nn.Parameter(torch.zeros(target.shape, dtype=adapter_dtype(base_weight), device=base_weight.device))

    def forward(self, x, base_out=None, base_weight=None):
        return F.linear(x.to(self.weight.dtype), self.weight)

    def delta_weight(self, base_weight=None):
        return self.weight

    def param_roles(self):
        yield "dense", self.weight, True
