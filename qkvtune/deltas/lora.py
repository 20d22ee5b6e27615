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
    rate_family = "lora"  # DoRA too: a low-rank update with the same scale
    rate_grid = (3e-4, 1e-3, 3e-3)  # the rates worth trying (the claims suite's lr_grid for this family)
    hparam_keys = config_keys = ("rank", "alpha", "rslora", "dropout")
    peft_type = "LORA"
    peft_variant = {"use_dora": False}

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

    def factors(self):
        return self.lora_A, self.lora_B

    def low_rank(self):
        return self.lora_A, self.lora_B, self.scale

    @classmethod
    def parameter_count(cls, cfg, rows, in_features):
        return cfg.rank * (rows + in_features)

    @classmethod
    def kernel_factor(cls, cfg, rows, in_features):
        """At B = 0 only B moves: ∂f/∂B = s·G·Aᵀ for the weight gradient G, and PEFT's Kaiming-uniform A (a = √5:
        entries U(±1/√in), variance 1/(3·in)) gives E[AᵀA] = r/(3·in)·I, so the kernel is s²·r/(3·in) times the
        weights', carried by the r·rows entries of B. (DoRA's magnitude is left out: the same factor.)"""
        s = lora_scale(cfg.rank, cfg.alpha, cfg.rslora)
        return s * s * cfg.rank / (3.0 * in_features), cfg.rank * rows

    @classmethod
    def kernel_growth(cls, cfg, rows, in_features, rule):
        """Once B ≠ 0, A moves too: ∂f/∂A = s·Bᵀ·G, whose kernel for B of root mean square σ is s²·r·σ² times the
        weights' (E[B·Bᵀ] = r·σ²·I), carried by the r·in entries of A. Against B's (kernel_factor): SGD adds
        3·in·σ²; Adam, which moves every parameter at the same pace, weighs each block by √(c·P/E‖ḡ‖²) and adds
        σ·√3·in/√rows."""
        if rule == "sgd":
            return 3.0 * in_features, 2
        return 3.0 ** 0.5 * in_features / rows ** 0.5, 1

    def moved_rms(self):
        return float(self.lora_B.detach().pow(2).mean().sqrt())

    # --- PEFT: slices of a fused projection become one LoRA of rank Σrᵢ on the whole module, with B zero
    # outside the slices' rows; PEFT then reproduces the outputs exactly and untouched slices stay untouched.
    @classmethod
    def to_peft(cls, deltas, weight_rows):
        d0 = deltas[0]
        if len(deltas) == 1 and d0.target.rows.covers(d0.target.out_features):
            return cls._peft_extra(deltas, weight_rows, {"lora_A.weight": d0.lora_A, "lora_B.weight": d0.lora_B}), \
                {"r": d0.rank, "lora_alpha": d0.alpha}
        rank = sum(d.rank for d in deltas)
        alpha = d0.scale * (rank ** 0.5 if d0.rslora else rank)  # the first slice's scale at the combined rank
        scale = lora_scale(rank, alpha, d0.rslora)
        A = torch.cat([d.lora_A for d in deltas], 0)
        B = A.new_zeros(d0.target.out_features, rank)
        col = 0
        for d in deltas:
            B[d.target.rows.index(B.device), col:col + d.rank] = d.lora_B * (d.scale / scale)
            col += d.rank
        return cls._peft_extra(deltas, weight_rows, {"lora_A.weight": A, "lora_B.weight": B}), \
            {"r": rank, "lora_alpha": alpha}

    @classmethod
    def _peft_extra(cls, deltas, weight_rows, tensors):
        return tensors

    @classmethod
    def peft_config(cls, deltas):
        d0 = deltas[0]
        return {"use_rslora": d0.rslora, "lora_dropout": d0.dropout_p, **cls.peft_variant}

    @classmethod
    def from_peft(cls, tensors, target):
        idx = target.rows.index()
        return {"lora_A": tensors["lora_A.weight"], "lora_B": tensors["lora_B.weight"][idx]}

    @classmethod
    def hparams_from_peft(cls, config, rank, alpha):
        return {"rank": rank, "alpha": alpha, "rslora": bool(config.get("use_rslora")),
                "dropout": float(config.get("lora_dropout") or 0)}
