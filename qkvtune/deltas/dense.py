"""Dense delta: the whole slice is trainable ("full fine-tuning of Q and V only"), stored as ΔW from zero."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Delta, adapter_dtype


class Dense(Delta):
    method = "dense"
    rate_family = "dense"
    rate_grid = (3e-5, 1e-4, 3e-4)  # the rates worth trying (the claims suite's lr_grid for this family)

    def __init__(self, target, base_weight: torch.Tensor):
        super().__init__(target)
        self.weight = nn.Parameter(torch.zeros(target.shape, dtype=adapter_dtype(base_weight), device=base_weight.device))

    def forward(self, x, base_out=None, base_weight=None):
        return F.linear(x.to(self.weight.dtype), self.weight)

    def delta_weight(self, base_weight=None):
        return self.weight

    def param_roles(self):
        yield "dense", self.weight, True

    @classmethod
    def parameter_count(cls, cfg, rows, in_features):
        return rows * in_features

    @classmethod
    def kernel_factor(cls, cfg, rows, in_features):
        """ΔW is the slice's weights: their kernel, every entry moving."""
        return 1.0, rows * in_features
