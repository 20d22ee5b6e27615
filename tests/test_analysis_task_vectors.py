"""Task vectors on ΔW: adding two adapters' vectors equals running with both deltas; negation restores the base
weights bit for bit; λ is chosen on a validation function; saved adapters give the same vector; cosines and
kernel alignment."""

import copy

import pytest
import torch

from conftest import tiny
from qkvtune import attach, io
from qkvtune.analysis import AnalysisError
from qkvtune.analysis.task_vectors import (TaskVector, apply, choose_coefficient, combine, kernel_alignment,
                                           restore, similarity_report)
from qkvtune.targets import find_targets


def _randomize(model, name, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model, name):
            for p in d.parameters():
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _two_adapters(arch="bert", dtype=torch.float64, labels=2):
    model = tiny(arch, labels).to(dtype)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", "a", heads=[], rank=2, alpha=4)
    attach.add_adapter(model, find_targets(model, ["v", "o"]), "dora", "b", heads=[], rank=3, alpha=6)
    _randomize(model, "a", 1)
    _randomize(model, "b", 2)
    return model


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "adapters" not in n}


def test_adding_two_task_vectors_equals_applying_both_deltas(ids):
    model = _two_adapters()
    attach.set_adapter(model, ["a", "b"])
    with torch.no_grad():
        both = model(ids).logits
    tau = TaskVector.from_model(model, "a") + TaskVector.from_model(model, "b")
    assert len(tau.deltas) == 2 * 2 + 2 * 2 - 2  # q, v of a; v, o of b; v shared (summed) per layer
    attach.set_adapter(model, [])  # deltas off: the plain base
    with torch.no_grad():
        base = model(ids).logits
        apply(model, tau)
        added = model(ids).logits
    assert (added - both).abs().max() <= 1e-10
    assert (base - both).abs().max() > 1e-4
    assert (combine([TaskVector.from_model(model, "a"), TaskVector.from_model(model, "b")]).deltas.keys()
            == tau.deltas.keys())


def test_task_vector_applies_to_a_plain_gpt2_with_fused_slices(ids):
    plain = tiny("gpt2")
    model = copy.deepcopy(plain)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=2, alpha=4)
    _randomize(model, "default", 3)
    with torch.no_grad():
        tuned = model(ids).logits
        apply(plain, TaskVector.from_model(model))
        assert (plain(ids).logits - tuned).abs().max() <= 1e-5
    k_rows = plain.transformer.h[0].attn.c_attn.weight[:, 32:64]
    assert torch.equal(k_rows, model.transformer.h[0].attn.c_attn.base.weight[:, 32:64])  # k untouched


def test_task_vector_on_mlp_slices(ids):
    """τ of a LoRA on up and down (Phi-3: up is the second half of the fused gate_up_proj) applied to the plain model
    gives the tuned outputs; the gate rows stay bit-identical; −τ restores every weight bit for bit."""
    plain = tiny("phi3")
    model = copy.deepcopy(plain)
    attach.add_adapter(model, find_targets(model, ["up", "down"]), "lora", rank=2, alpha=4)
    _randomize(model, "default", 5)
    before = _weights(plain)
    tau = TaskVector.from_model(model)
    assert tau.kinds() == ["down", "up"] and len(tau.deltas) == 2 * 2
    half = plain.config.intermediate_size
    with torch.no_grad():
        tuned = model(ids).logits
        apply(plain, tau)
        assert (plain(ids).logits - tuned).abs().max() <= 1e-5
        fused = plain.model.layers[0].mlp.gate_up_proj.weight
        assert torch.equal(fused[:half], before["model.layers.0.mlp.gate_up_proj.weight"][:half])  # gate untouched
        assert not torch.equal(fused[half:], before["model.layers.0.mlp.gate_up_proj.weight"][half:])
        apply(plain, -tau)
    assert all(torch.equal(p, before[n]) for n, p in _weights(plain).items())


def test_negation_restores_the_base_weights_exactly():
    model = _two_adapters(dtype=torch.float32)
    attach.set_adapter(model, [])
    before = _weights(model)
    ta, tb = TaskVector.from_model(model, "a"), TaskVector.from_model(model, "b")
    # why the ledger is needed: plain float arithmetic does not undo itself
    w = next(iter(before.values()))
    d = 0.37 * torch.randn(w.shape)
    assert not torch.equal((w + d) - d, w)
    for steps in ([(ta, 1.0), (-ta, 1.0)], [(ta, 0.7), (ta, -0.7)], [(ta, 1.0), (tb, 0.5), (-ta, 1.0), (tb, -0.5)],
                  [(ta + tb, 1.3), (-(ta + tb), 1.3)]):
        for tv, c in steps:
            apply(model, tv, c)
        after = _weights(model)
        assert all(torch.equal(after[n], before[n]) for n in before)
    apply(model, ta, 2.0)
    apply(model, tb)
    assert not torch.equal(_weights(model)["bert.encoder.layer.0.attention.self.query.base.weight"],
                           before["bert.encoder.layer.0.attention.self.query.base.weight"])
    restore(model)
    assert all(torch.equal(_weights(model)[n], before[n]) for n in before)


def test_choose_coefficient_on_validation_and_model_left_unchanged():
    model = _two_adapters()
    attach.set_adapter(model, [])
    tau = TaskVector.from_model(model, "a")
    key = next(iter(tau.deltas))
    wrapper = model.get_submodule(key[0])
    w0 = wrapper.slice_weight(key[2]).detach().clone()
    goal = w0 + 0.6 * tau.deltas[key]

    def score(m):  # validation: closeness of one slice to θ₀ + 0.6τ
        return -float((m.get_submodule(key[0]).slice_weight(key[2]) - goal).norm())

    out = choose_coefficient(model, tau, score, coefs=[0.0, 0.3, 0.6, 0.9, 1.2])
    assert out["coef"] == 0.6 and len(out["scores"]) == 5
    assert torch.equal(wrapper.slice_weight(key[2]), w0)
    assert choose_coefficient(model, tau, score, coefs=[0.0, 0.6], greater_is_better=False)["coef"] == 0.0


def test_saved_adapter_gives_the_same_task_vector(tmp_path):
    model = tiny("bert", 2)
    base = copy.deepcopy(model)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=2, alpha=4)
    _randomize(model, "default", 4)
    io.save_adapter(model, str(tmp_path))
    loaded = TaskVector.from_adapter(base, str(tmp_path))
    here = TaskVector.from_model(model)
    assert loaded.deltas.keys() == here.deltas.keys()
    assert all(torch.equal(loaded.deltas[k], here.deltas[k]) for k in here.deltas)  # the same factors, same product
    assert attach.adapter_names(base) == []  # the temporary adapter is gone again


def test_arithmetic_cosine_and_kernel_alignment():
    model = _two_adapters()
    ta, tb = TaskVector.from_model(model, "a"), TaskVector.from_model(model, "b")
    assert ta.cos(2 * ta) == pytest.approx(1.0) and ta.cos(-ta) == pytest.approx(-1.0)
    assert (ta * 3).norm() == pytest.approx(3 * ta.norm())
    assert (ta - ta).norm() == 0.0 and sum([ta, tb]).norm() == pytest.approx((ta + tb).norm())
    assert ta.cos(tb, kind="q") == 0.0  # b has no q slices
    assert -1 <= ta.cos(tb) <= 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    k1, k2 = x @ x.T, torch.eye(10, dtype=torch.float64)
    assert kernel_alignment(k1, 3 * k1) == pytest.approx(1.0)
    assert kernel_alignment(k1, k2) == pytest.approx(float(k1.trace() / (k1.norm() * 10 ** 0.5)))
    ones = torch.ones(10, 10, dtype=torch.float64)
    assert kernel_alignment(k1 + 5 * ones, k1, centered=True) == pytest.approx(1.0)
    report = similarity_report({"a": ta, "b": tb}, {"a": k1, "b": k2})
    assert report["cosine"][0][0] == pytest.approx(1.0) and report["kernel_alignment"][1][1] == pytest.approx(1.0)
    assert set(report["cosine_per_kind"]) == {"q", "v", "o"}
    with pytest.raises(AnalysisError, match="kernels"):
        kernel_alignment(k1, torch.eye(3))
    wrong = TaskVector({k: torch.zeros(2, 2) for k in ta.deltas})
    with pytest.raises(AnalysisError, match="shape"):
        apply(model, wrong)
