"""Adapter analysis after the LoRA paper (§7, Appendix G/H): subspace similarity between adapters, the
amplification factor of ΔW with respect to W, and the singular spectrum / effective rank of each ΔW.

* φ(A₁, A₂, i, j) = ‖U₁[:, :i]ᵀ U₂[:, :j]‖²_F / min(i, j) ∈ [0, 1], U = right singular vectors of A
  (the row space of A, §7.2's convention); with ``side="B"`` the left singular vectors of B.
  Methods without an A factor (dense, block-sparse) use ΔW itself (its row / column space).
* amplification = ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F with U_r, V_r the top-r left/right singular vectors of ΔW,
  reported next to the same projection onto W's own top-r directions and onto random ones (one draw, and the
  closed-form expectation √(r²/(m·n))·‖W‖_F over all draws).
"""

from __future__ import annotations

import math

import torch

from . import AnalysisError
from .ntk import few_threads


def basis(m: torch.Tensor, side: str) -> torch.Tensor:
    """Orthonormal columns spanning the row space (side A) or column space (side B) of m, by singular value."""
    with few_threads(max(m.shape)):
        u, _, vh = torch.linalg.svd(m.detach().double(), full_matrices=False)
    return vh.T if side == "A" else u


def subspace_similarity(m1: torch.Tensor, m2: torch.Tensor, side: str = "A") -> torch.Tensor:
    """φ(i, j) for every 1 ≤ i ≤ r₁, 1 ≤ j ≤ r₂ as an (r₁, r₂) matrix (entry [i-1, j-1]).

    ``side="A"``: m1, m2 are A-like (r × in), compared by their right singular vectors; ``side="B"``:
    B-like (out × r), compared by their left singular vectors.
    """
    if side not in ("A", "B"):
        raise AnalysisError(f"side: {side!r} is not A or B")
    u1, u2 = basis(m1, side), basis(m2, side)
    if u1.shape[0] != u2.shape[0]:
        raise AnalysisError(f"adapters: the matrices live in different spaces ({u1.shape[0]} vs {u2.shape[0]} dims)")
    cum = ((u1.T @ u2) ** 2).cumsum(0).cumsum(1)  # ‖U₁[:, :i]ᵀU₂[:, :j]‖²_F for all i, j
    i = torch.arange(1, cum.shape[0] + 1, dtype=torch.float64)[:, None]
    j = torch.arange(1, cum.shape[1] + 1, dtype=torch.float64)[None, :]
    return cum / torch.minimum(i, j)


def random_similarity(dim: int, i: int, j: int) -> float:
    """E φ for independent uniformly random subspaces of dimensions i and j in R^dim: ij/dim / min(i, j)
    = max(i, j)/dim."""
    return max(i, j) / dim


def direction_shares(m1: torch.Tensor, m2: torch.Tensor, side: str = "A") -> torch.Tensor:
    """‖U₂ᵀ u₁ₖ‖² for each singular direction k of m1 (by singular value): the share of m1's k-th direction
    that lies in m2's whole subspace (φ(1, r₂) for k = 1). A random direction has r₂/d in expectation."""
    u1, u2 = basis(m1, side), basis(m2, side)
    r1 = min(m1.shape) if side == "A" else m1.shape[1]
    r2 = min(m2.shape) if side == "A" else m2.shape[1]
    return ((u2[:, :r2].T @ u1[:, :r1]) ** 2).sum(0)


def adapter_factors(model, name: str | None = None, side: str = "A") -> dict[str, torch.Tensor]:
    """"module[kind]" -> the matrix φ compares for each delta of adapter ``name``: LoRA/DoRA's A (side A)
    or B (side B); otherwise ΔW itself."""
    out = {}
    for wrapper, delta in _deltas(model, name):
        factors = delta.factors()
        if factors is not None:
            out[delta.target.name] = factors[0 if side == "A" else 1].detach()
        else:
            out[delta.target.name] = delta.delta_weight(wrapper.slice_weight(delta.target.rows)).detach()
    return out


def _deltas(model, name):
    from ..attach import iter_deltas

    pairs = list(iter_deltas(model, name))
    if not pairs:
        raise AnalysisError(f"adapter: the model has no adapter named {name!r}")
    return pairs


def delta_weights(model, name: str | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """"module[kind]" -> (ΔW, W) of each delta of adapter ``name``, both (rows × in), W the frozen slice."""
    out = {}
    for wrapper, delta in _deltas(model, name):
        w = wrapper.slice_weight(delta.target.rows).detach()
        out[delta.target.name] = (delta.delta_weight(w).detach(), w)
    return out


def _rank_tol(m: torch.Tensor) -> float:
    """Relative singular-value cut-off for the numerical rank, as numpy.linalg.matrix_rank (max dim · eps)."""
    eps = torch.finfo(m.dtype).eps if m.is_floating_point() else torch.finfo(torch.float64).eps
    return max(m.shape) * eps


def amplification(delta_w: torch.Tensor, w: torch.Tensor, r: int | None = None, seed: int = 0) -> dict:
    """LoRA Table 7 for one matrix: ‖U_rᵀ X V_r‖_F for X = W with (U_r, V_r) from ΔW, from W itself, and random
    orthonormal; ‖ΔW‖_F, ‖W‖_F and factor = ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F (ΔW's directions). ``r`` defaults to
    the numerical rank of ΔW."""
    tol = _rank_tol(delta_w)
    dw, w = delta_w.detach().double(), w.detach().double()
    if dw.shape != w.shape:
        raise AnalysisError(f"delta_w: shape {tuple(dw.shape)} differs from W's {tuple(w.shape)}")
    with few_threads(max(dw.shape)):
        u, s, vh = torch.linalg.svd(dw, full_matrices=False)
        uw, sw, vhw = torch.linalg.svd(w, full_matrices=False)
    if r is None:
        r = max(1, int((s > s[0] * tol).sum())) if s[0] > 0 else 1
    if not 0 < r <= len(s):
        raise AnalysisError(f"r: must be in 1..{len(s)}, got {r}")
    g = torch.Generator().manual_seed(seed)
    ur = torch.linalg.qr(torch.randn(w.shape[0], r, generator=g, dtype=torch.float64))[0]
    vr = torch.linalg.qr(torch.randn(w.shape[1], r, generator=g, dtype=torch.float64))[0]

    def proj(a, b):
        return float(torch.linalg.matrix_norm(a.T @ w @ b))

    along_dw = proj(u[:, :r], vh[:r].T)
    return {"r": r, "norm_delta": float(s.norm()), "norm_w": float(sw.norm()),
            "proj_delta_dirs": along_dw, "proj_w_dirs": proj(uw[:, :r], vhw[:r].T), "proj_random": proj(ur, vr),
            # E‖UᵀWV‖²_F = (r/m)(r/n)‖W‖²_F for independent uniformly random orthonormal U (m×r), V (n×r)
            "proj_random_expected": math.sqrt(r * r / (w.shape[0] * w.shape[1])) * float(sw.norm()),
            "factor": float(s.norm()) / along_dw if along_dw > 0 else math.inf}


def spectrum(delta_w: torch.Tensor) -> dict:
    """Singular values of ΔW and two effective ranks: entropy rank exp(H(σ/Σσ)) (Roy & Vetterli) and
    stable rank ‖ΔW‖²_F/‖ΔW‖²₂."""
    tol = _rank_tol(delta_w)
    with few_threads(max(delta_w.shape)):
        s = torch.linalg.svdvals(delta_w.detach().double())
    if s[0] <= 0:
        return {"singular_values": s.tolist(), "entropy_rank": 0.0, "stable_rank": 0.0, "numerical_rank": 0}
    p = s / s.sum()
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return {"singular_values": s.tolist(), "entropy_rank": float(h.exp()),
            "stable_rank": float((s ** 2).sum() / s[0] ** 2), "numerical_rank": int((s > s[0] * tol).sum())}


def compare_adapters(model, name1: str, name2: str, side: str = "A") -> dict[str, torch.Tensor]:
    """φ matrices for every slice the two adapters share ("module[kind]" -> (r₁, r₂))."""
    f1, f2 = adapter_factors(model, name1, side), adapter_factors(model, name2, side)
    common = [k for k in f1 if k in f2]
    if not common:
        raise AnalysisError(f"adapters: {name1!r} and {name2!r} share no slice")
    return {k: subspace_similarity(f1[k], f2[k], side) for k in common}
