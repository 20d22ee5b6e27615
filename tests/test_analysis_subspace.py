"""Adapter analysis (LoRA §7): φ of an adapter with itself is 1 on the diagonal; of independent random subspaces
≈ max(i, j)/k; the amplification factor equals a hand computation; spectra and effective ranks; MLP slices."""

import math

import pytest
import torch

from conftest import tiny
from qkvtune import attach
from qkvtune.analysis import AnalysisError
from qkvtune.analysis.subspace import (adapter_factors, amplification, compare_adapters, delta_weights,
                                       random_similarity, spectrum, subspace_similarity)
from qkvtune.targets import find_targets


def test_phi_of_an_adapter_with_itself_is_one_on_the_diagonal():
    a = torch.randn(8, 64, dtype=torch.float64)
    phi = subspace_similarity(a, a)
    assert phi.shape == (8, 8)
    assert torch.allclose(phi.diagonal(), torch.ones(8, dtype=torch.float64), atol=1e-12)
    assert (phi <= 1 + 1e-12).all() and (phi >= 0).all()
    # nested: the top-i directions of A lie inside its top-j ones for j >= i
    assert torch.allclose(phi.triu(), torch.ones(8, 8, dtype=torch.float64).triu(), atol=1e-12)
    b = torch.randn(64, 8, dtype=torch.float64)
    assert torch.allclose(subspace_similarity(b, b, side="B").diagonal(), torch.ones(8, dtype=torch.float64))


def test_phi_of_random_subspaces_is_max_over_dimension():
    k, r1, r2, trials = 256, 8, 64, 40
    total = torch.zeros(r1, r2, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for _ in range(trials):
        total += subspace_similarity(torch.randn(r1, k, generator=g, dtype=torch.float64),
                                     torch.randn(r2, k, generator=g, dtype=torch.float64))
    mean = total / trials
    expected = torch.tensor([[random_similarity(k, i, j) for j in range(1, r2 + 1)] for i in range(1, r1 + 1)],
                            dtype=torch.float64)
    assert torch.allclose(mean, expected, rtol=0.15, atol=0.01)
    assert mean[-1, -1] == pytest.approx(64 / 256, rel=0.05)


def test_phi_sees_a_shared_direction():
    g = torch.Generator().manual_seed(1)
    shared = torch.randn(1, 128, generator=g, dtype=torch.float64) * 10
    a1 = torch.cat([shared, torch.randn(3, 128, generator=g, dtype=torch.float64)])
    a2 = torch.cat([shared, torch.randn(15, 128, generator=g, dtype=torch.float64)])
    assert subspace_similarity(a1, a2)[0, 0] > 0.95


def test_amplification_matches_a_hand_computation():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(24, 16, generator=g, dtype=torch.float64)
    b, a = torch.randn(24, 2, generator=g, dtype=torch.float64), torch.randn(2, 16, generator=g, dtype=torch.float64)
    dw = b @ a
    out = amplification(dw, w)
    u, s, vh = torch.linalg.svd(dw)
    u2, v2 = u[:, :2], vh[:2].T
    by_hand = torch.linalg.matrix_norm(u2.T @ w @ v2)
    assert out["r"] == 2
    assert out["proj_delta_dirs"] == pytest.approx(float(by_hand), rel=1e-12)
    assert out["factor"] == pytest.approx(float(torch.linalg.matrix_norm(dw) / by_hand), rel=1e-12)
    assert out["norm_w"] == pytest.approx(float(w.norm()))
    sw = torch.linalg.svdvals(w)
    assert out["proj_w_dirs"] == pytest.approx(float(sw[:2].norm()), rel=1e-12)  # W's top-2: σ₁, σ₂
    assert out["proj_random"] < out["proj_w_dirs"]
    assert amplification(dw, w, r=1)["r"] == 1
    with pytest.raises(AnalysisError, match="r:"):
        amplification(dw, w, r=99)


def test_spectrum_and_effective_rank():
    dw = torch.diag(torch.tensor([3.0, 3.0, 3.0, 0.0], dtype=torch.float64))
    s = spectrum(dw)
    assert s["numerical_rank"] == 3 and s["entropy_rank"] == pytest.approx(3) and s["stable_rank"] == pytest.approx(3)
    assert spectrum(torch.zeros(3, 3))["entropy_rank"] == 0.0


def test_adapters_on_a_model_lora_and_dense():
    model = tiny("gpt2")
    targets = find_targets(model, ["q", "v"])
    attach.add_adapter(model, targets, "lora", "r4", rank=4, alpha=8)
    attach.add_adapter(model, targets, "lora", "r8", rank=8, alpha=8)
    attach.add_adapter(model, targets, "dense", "full")
    with torch.no_grad():
        for name in ("r4", "r8", "full"):
            for _, d in attach.iter_deltas(model, name):
                for p in d.parameters():
                    p.normal_()
    phis = compare_adapters(model, "r4", "r8")
    assert len(phis) == 4 and all(v.shape == (4, 8) for v in phis.values())
    assert all(torch.allclose(v.diagonal(), torch.ones(4, dtype=torch.float64)) for v in
               compare_adapters(model, "r4", "r4").values())
    factors = adapter_factors(model, "full")
    assert next(iter(factors.values())).shape == (32, 32)  # dense: ΔW itself
    assert compare_adapters(model, "r4", "full", side="B")["transformer.h.0.attn.c_attn[q]"].shape == (4, 32)
    for key, (dw, w) in delta_weights(model, "r4").items():
        assert dw.shape == w.shape == (32, 32)
        assert spectrum(dw)["numerical_rank"] == 4
        assert math.isfinite(amplification(dw, w)["factor"])
    with pytest.raises(AnalysisError, match="adapter"):
        delta_weights(model, "nope")


def test_random_projection_expectation_matches_many_draws():
    """amplification's closed-form baseline √(r²/(m·n))·‖W‖_F against the root mean square over random draws."""
    torch.manual_seed(0)
    w, dw = torch.randn(40, 30, dtype=torch.float64), torch.randn(40, 3, dtype=torch.float64) @ torch.randn(3, 30, dtype=torch.float64)
    draws = [amplification(dw, w, seed=s)["proj_random"] ** 2 for s in range(400)]
    row = amplification(dw, w)
    assert row["r"] == 3
    assert row["proj_random_expected"] == pytest.approx(math.sqrt(sum(draws) / len(draws)), rel=0.05)


def test_adapters_on_mlp_slices():
    """φ, ΔW and amplification on MLP slices: W is the slice's own rows of the frozen weight (the gate and up halves
    of Phi-3's fused gate_up_proj, down_proj whole), ΔW the adapter's s·B·A there."""
    model = tiny("phi3")
    attach.add_adapter(model, find_targets(model, "mlp"), "lora", "r2", rank=2, alpha=4)
    attach.add_adapter(model, find_targets(model, "mlp"), "lora", "r4", rank=4, alpha=4)
    with torch.no_grad():
        for name in ("r2", "r4"):
            for _, d in attach.iter_deltas(model, name):
                d.lora_B.normal_()
    phis = compare_adapters(model, "r2", "r4")
    assert len(phis) == 3 * 2 and all(v.shape == (2, 4) for v in phis.values())
    half = model.config.intermediate_size
    mlp = model.model.layers[1].mlp
    fused = mlp.gate_up_proj.base.weight
    pairs = delta_weights(model, "r2")
    for key, w in (("model.layers.1.mlp.gate_up_proj[gate]", fused[:half]),
                   ("model.layers.1.mlp.gate_up_proj[up]", fused[half:]),
                   ("model.layers.1.mlp.down_proj[down]", mlp.down_proj.base.weight)):
        dw, w_slice = pairs[key]
        delta = mlp.gate_up_proj.adapters["r2"][key[key.index("[") + 1:-1]] if "gate_up" in key \
            else mlp.down_proj.adapters["r2"]["down"]
        assert torch.equal(w_slice, w)  # bit-exact here and below: the same rows, and the same product s·B·A
        torch.testing.assert_close(dw, delta.scale * delta.lora_B @ delta.lora_A, rtol=0, atol=0)
        row = amplification(dw, w_slice)
        assert row["r"] == 2 and math.isfinite(row["factor"]) and spectrum(dw)["numerical_rank"] == 2
