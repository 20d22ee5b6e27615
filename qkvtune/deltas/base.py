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
    """Base class. ``target`` says which slice; ``kind`` (q, k, v, o, …) drives learning rates.

    A method declares here everything the rest of qkvtune needs to know about it, so nothing outside
    ``deltas/`` asks which method a delta is: its config keys (``config_keys``), whether its slices and
    blocks come from a selection (``needs_selection``: SMT), and its PEFT form (``to_peft``/``from_peft``)
    where one exists (``peft_type``)."""

    method: str = "delta"          # the registry name (deltas/__init__.py), stored in adapter files
    needs_base_out: bool = False   # DoRA rescales the slice's base output
    hparam_keys: tuple[str, ...] = ()  # constructor keywords: what ``hyperparameters()`` saves
    config_keys: tuple[str, ...] = ()  # TrainConfig keys among them (SMT's blocks come from its selection)
    needs_selection: bool = False  # slices and blocks come from a selection step (SMT), not from targets
    peft_type: str | None = None   # PEFT's peft_type of the equivalent adapter, or None (no PEFT form)
    peft_variant: dict = {}        # adapter_config.json flags that tell this method apart (use_dora)
    rate_family: str = "delta"     # methods whose good learning rates lie on one grid (the claims suite's lr_grid)
    rate_grid: tuple[float, ...] = ()  # that grid (log-spaced η_Q): what ``qkvtune plan`` predicts by default

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
        """What is needed to rebuild this delta (saved with the adapter; ``build_delta`` takes it back)."""
        return {}

    @classmethod
    def hparams_from_config(cls, cfg) -> dict:
        """This method's constructor keywords from a run config (``config_keys``)."""
        return {k: getattr(cfg, k) for k in cls.config_keys}

    @classmethod
    def parameter_count(cls, cfg, rows: int, in_features: int) -> int:
        """Trainable parameters of this method (with ``cfg``'s hyperparameters) on a slice of rows × in_features."""
        raise NotImplementedError(f"{cls.method} states no parameter count")

    @classmethod
    def kernel_factor(cls, cfg, rows: int, in_features: int) -> tuple[float, int]:
        """(c, P): at its initialisation this method's kernel on a slice is c times the kernel of the slice's
        weights (in expectation over its random initialisation), carried by P parameters that move there (what
        ``qkvtune plan`` simulates, and what Adam normalises each step by)."""
        raise NotImplementedError(f"{cls.method} has no kernel at initialisation to plan with")

    @classmethod
    def kernel_growth(cls, cfg, rows: int, in_features: int, rule: str) -> tuple[float, int]:
        """(γ, p): as training moves the parameters that move at initialisation to a root mean square σ, the
        method's kernel on a slice grows to (1 + γ·σᵖ) times its initial one under the update ``rule`` ("adam",
        "sgd"); (0, 1) for a method whose kernel stays (dense)."""
        return 0.0, 1

    def moved_rms(self) -> float | None:
        """The root mean square of the parameters that move first (LoRA's B): what a short real run measures of
        ``kernel_growth``'s σ; None where the kernel does not grow."""
        return None

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Low-rank factors (A: r × in, B: rows × r) when ΔW is their product, else None (subspace analysis)."""
        return None

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, s) when the slice's output gains exactly s·x·Aᵀ·Bᵀ, whatever the base: a consumer that applies
        plain LoRA (llama.cpp, vLLM) computes this delta. None otherwise (DoRA rescales rows by the base, dense
        and block-sparse updates are not low-rank)."""
        return None

    # --- PEFT form, where the method has one (one PEFT module may hold several slices) -------------------
    @classmethod
    def to_peft(cls, deltas: list["Delta"], weight_rows: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
        """PEFT tensors (names relative to the module) and per-module settings for the deltas of one module."""
        raise NotImplementedError(f"{cls.method} has no PEFT form")

    @classmethod
    def peft_config(cls, deltas: list["Delta"]) -> dict:
        """Method-specific fields of PEFT's adapter_config.json."""
        raise NotImplementedError(f"{cls.method} has no PEFT form")

    @classmethod
    def from_peft(cls, tensors: dict[str, torch.Tensor], target: Target) -> dict[str, torch.Tensor]:
        """This slice's share of one PEFT module's tensors, keyed by this delta's parameter names."""
        raise NotImplementedError(f"{cls.method} has no PEFT form")

    @classmethod
    def hparams_from_peft(cls, config: dict, rank: int, alpha: float) -> dict:
        """Constructor keywords from PEFT's adapter_config.json (rank and alpha already resolved per module)."""
        raise NotImplementedError(f"{cls.method} has no PEFT form")

    def extra_repr(self) -> str:
        return f"{self.target.module}[{self.kind}] rows={self.target.rows}"


def adapter_dtype(base_weight: torch.Tensor) -> torch.dtype:
    """Adapters train in fp32 on half-precision bases (as PEFT does); otherwise in the base dtype."""
    return torch.float32 if base_weight.dtype in (torch.float16, torch.bfloat16) else base_weight.dtype
