"""Deltas on slices: outputs equal a dense reference model with W + ΔW written in by hand; merge is
invisible in the outputs; unmerge restores the weights bit for bit; untouched slices stay untouched."""

import copy
import math

import pytest
import torch

from conftest import randomize_deltas, tiny
from qkvtune import attach
from qkvtune.targets import find_targets

ARCHS = [("bert", 2), ("gpt2", None), ("neox", None), ("phi3", None), ("llama", 2)]


def _reference(base, model, method):
    """Copy of the base model with each slice's weight replaced by hand-computed W + ΔW."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for wrapper, d in attach.iter_deltas(model):
            W = ref.get_submodule(d.target.module).weight
            Wr = W.t() if d.target.transposed else W  # (out, in) view
            idx = d.target.rows.index()
            W0 = Wr[idx].clone()
            if method == "lora":
                dW = d.scale * d.lora_B @ d.lora_A
                assert math.isclose(d.scale, d.alpha / d.rank)
            elif method == "dora":
                V = W0 + (d.alpha / d.rank) * d.lora_B @ d.lora_A
                dW = d.magnitude[:, None] * V / V.norm(dim=1, keepdim=True) - W0
            else:
                dW = d.weight
            Wr[idx] = W0 + dW
    return ref


@pytest.mark.parametrize("arch,labels", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dora", "dense"])
@pytest.mark.parametrize("kinds", [["q", "v"], "all-linear"])
def test_delta_matches_dense_reference_and_merge(arch, labels, method, kinds, ids):
    base = tiny(arch, labels)
    model = copy.deepcopy(base)
    targets = find_targets(model, kinds)  # all-linear: MLP slices (Phi-3's fused gate/up halves) and the rest too
    attach.add_adapter(model, targets, method, rank=4, alpha=8, heads=[])
    randomize_deltas(model)
    model.eval()
    ref = _reference(base, model, method)
    out = lambda m: (m(ids).logits)
    with torch.no_grad():
        y, y_ref = out(model), out(ref)
        assert not torch.allclose(out(base), y_ref, atol=1e-4)  # the delta does something
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-4)
        before = {n: p.clone() for n, p in model.named_parameters()}
        attach.merge_adapter(model)
        torch.testing.assert_close(out(model), y_ref, atol=1e-5, rtol=1e-4)
        attach.unmerge_adapter(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n  # bit-exact: unmerge restores the weights it kept
        torch.testing.assert_close(out(model), y, atol=0, rtol=0)  # the same path as y: bit-exact


def test_fused_k_slice_untouched_by_training_and_merge(ids):
    model = tiny("gpt2")
    w0 = [h.attn.c_attn.weight.detach().clone() for h in model.transformer.h]
    targets = find_targets(model, ["q", "v"])
    attach.add_adapter(model, targets, "lora", rank=2, alpha=4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    attach.merge_adapter(model)
    for h, w in zip(model.transformer.h, w0):
        W = h.attn.c_attn.weight
        assert torch.equal(W[:, 32:64], w[:, 32:64])      # k columns bit-identical
        assert not torch.equal(W[:, :32], w[:, :32])      # q changed
        assert not torch.equal(W[:, 64:], w[:, 64:])      # v changed


def test_only_deltas_and_head_train():
    model = tiny("bert", 3)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=2)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_" in n or n.startswith("classifier.copies.default.") for n in names)
    assert any(n.startswith("classifier.copies") for n in names)


def test_adapters_switch_with_their_heads(ids):
    base = tiny("bert", 2)
    model = copy.deepcopy(base)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", name="a", rank=2)
    randomize_deltas(model)
    with torch.no_grad():
        model.classifier.copies["a"].weight.add_(1.0)
    attach.add_adapter(model, find_targets(model, ["v"]), "dense", name="b")
    randomize_deltas(model)
    with torch.no_grad():
        attach.set_adapter(model, "a")
        ya = model(ids).logits
        attach.set_adapter(model, "b")
        yb = model(ids).logits
        attach.set_adapter(model, "a")
        torch.testing.assert_close(model(ids).logits, ya, atol=0, rtol=0)  # adapter a again: the same path
        assert not torch.allclose(ya, yb)
        attach.delete_adapter(model, "a")
        attach.delete_adapter(model, "b")
        torch.testing.assert_close(model(ids).logits, base(ids).logits)
    assert attach.adapter_names(model) == []


def test_unwrap_gives_plain_model_with_merged_weights(ids):
    model = tiny("llama", 2)
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=2)
    randomize_deltas(model)
    with torch.no_grad():
        y = model(ids).logits
        plain = attach.unwrap(model)
    assert not any(isinstance(m, (attach.DeltaProjection, attach.TrainableHead)) for m in plain.modules())
    assert all(k.count("base") == 0 for k in plain.state_dict())
    torch.testing.assert_close(plain(ids).logits, y, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch,labels", ARCHS)
@pytest.mark.parametrize("method", ["lora", "dora", "dense"])
def test_the_parameter_count_is_what_the_attached_deltas_hold(arch, labels, method):
    """deltas.parameter_count (what plan and the claims suite's equal-parameter arms use) against the deltas
    themselves, on fused, grouped-query and MLP slices."""
    from types import SimpleNamespace

    from qkvtune.deltas import parameter_count

    model = tiny(arch, labels)
    targets = find_targets(model, "all-linear")
    attach.add_adapter(model, targets, method, rank=3, alpha=6, heads=[])
    held = sum(p.numel() for _, d in attach.iter_deltas(model) for p in d.parameters())
    assert parameter_count(method, SimpleNamespace(rank=3, alpha=6, rslora=False), targets) == held > 0
