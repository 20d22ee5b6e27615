"""Targets: every architecture family labels q/k/v/o correctly, fused slices are the right rows."""

import pytest
import torch

from conftest import tiny
from qkvtune.targets import Rows, TargetError, find_targets, parse_layers


def test_bert_separate_projections():
    m = tiny("bert", 2)
    ts = find_targets(m, ["q", "k", "v", "o"])
    assert len(ts) == 8
    kinds = {(t.layer, t.kind): t.module for t in ts}
    assert kinds[(0, "q")] == "bert.encoder.layer.0.attention.self.query"
    assert kinds[(1, "o")] == "bert.encoder.layer.1.attention.output.dense"
    assert all(t.rows.covers(32) and not t.transposed for t in ts)


def test_llama_gqa_widths_and_layers():
    m = tiny("llama")
    ts = find_targets(m, ["q", "k", "v"], layers="last:2")
    assert sorted({t.layer for t in ts}) == [1, 2]
    by = {t.kind: t for t in ts if t.layer == 2}
    assert by["q"].shape == (32, 32) and by["k"].shape == (16, 32) and by["v"].shape == (16, 32)
    assert {t.layer for t in find_targets(m, "v", layers=[0, -1])} == {0, 2}
    assert {t.layer for t in find_targets(m, "v", layers="1:")} == {1, 2}


def test_gpt2_fused_thirds_match_attention_split():
    m = tiny("gpt2")
    ts = {t.kind: t for t in find_targets(m, ["q", "k", "v"]) if t.layer == 0}
    assert all(t.transposed and t.module == "transformer.h.0.attn.c_attn" for t in ts.values())
    # reference: GPT2Attention splits c_attn output with .split(embed_dim, dim=2) into q, k, v
    x = torch.randn(2, 5, 32)
    out = m.transformer.h[0].attn.c_attn(x)
    q, k, v = out.split(32, dim=2)
    for kind, ref in zip("qkv", (q, k, v)):
        assert torch.equal(out[..., ts[kind].rows.index()], ref)


def test_neox_per_head_rows_match_attention_split():
    m = tiny("neox")
    ts = {t.kind: t for t in find_targets(m, ["q", "k", "v"]) if t.layer == 0}
    x = torch.randn(2, 5, 32)
    out = m.gpt_neox.layers[0].attention.query_key_value(x)
    # reference: modeling_gpt_neox views (…, heads, 3*head_dim) then chunks into q, k, v
    q, k, v = out.view(2, 5, 4, 24).chunk(3, dim=-1)
    for kind, ref in zip("qkv", (q, k, v)):
        assert torch.equal(out[..., ts[kind].rows.index()].view(2, 5, 4, 8), ref)
    assert not ts["q"].rows.contiguous


def test_phi3_gqa_concat():
    m = tiny("phi3")
    ts = {t.kind: t for t in find_targets(m, ["q", "k", "v", "o"]) if t.layer == 0}
    assert ts["q"].rows == Rows.range(0, 32) and ts["k"].rows == Rows.range(32, 48)
    assert ts["v"].rows == Rows.range(48, 64) and ts["o"].module.endswith("o_proj")


def test_unknown_architecture_names_what_it_found():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(TargetError, match="projections found: 0"):
        find_targets(net, ["q"])
    ts = find_targets(net, ["q"], target_modules={"0": {"q": "0:2"}})
    assert ts[0].rows == Rows.range(0, 2)


def test_explicit_targets_and_errors():
    m = tiny("gpt2")
    ts = find_targets(m, ["q", "v"], target_modules={"attn.c_attn": {"q": "0:32", "v": "64:96"}})
    assert len(ts) == 4 and ts[1].rows == Rows.range(64, 96)
    with pytest.raises(TargetError, match="rows"):
        find_targets(m, ["q"], target_modules={"attn.c_attn": {"q": "0:500"}})
    with pytest.raises(TargetError, match=r"\['x'\] not found"):
        find_targets(m, ["x"])
    with pytest.raises(TargetError, match="layers"):
        parse_layers([5], 2)
    assert parse_layers("first:1", 3) == {0}
