"""SMT: the block-sparse backward equals the dense gradient masked to the selected blocks (float64) with an
exact input gradient; only the needed input columns are saved; full-budget SMT trains exactly like dense
ΔW; merge/unmerge and save/load are exact; warm-up sums, scores, budgets and selection files are right."""

import copy
import json
import math
import os

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from conftest import tiny
from qkvtune import attach, files, io, smt
from qkvtune.deltas import BlockSparse
from qkvtune.config import TrainConfig
from qkvtune.optim import param_groups
from qkvtune.targets import find_targets


def _grid(t, b):
    return -(-t.shape[0] // b), -(-t.shape[1] // b)


def _some_blocks(target, b, seed=0, frac=0.5):
    """A random half of the target's blocks, always including the last row and column block (ragged edges)
    and at least two blocks sharing a row block and a column block."""
    nr, nc = _grid(target, b)
    g = torch.Generator().manual_seed(seed)
    chosen = {(nr - 1, nc - 1), (nr - 1, 0), (0, nc - 1)}
    for i in torch.randperm(nr * nc, generator=g)[: max(1, int(frac * nr * nc))].tolist():
        chosen.add((i // nc, i % nc))
    return [{"module": target.module, "kind": target.kind, "row": r, "col": c, "score": 0.0} for r, c in sorted(chosen)]


def _dense_from_blocks(delta):
    """ΔW written by hand from the blocks (independent of BlockSparse.delta_weight)."""
    b, (R, C) = delta.block_size, delta.target.shape
    dW = torch.zeros(R, C, dtype=delta.values.dtype)
    for (r, c), v in zip(delta.blocks.tolist(), delta.values.detach()):
        h, w = min(b, R - r * b), min(b, C - c * b)
        dW[r * b:r * b + h, c * b:c * b + w] = v[:h, :w]
    return dW


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model):
            d.values.copy_(torch.randn(d.values.shape, generator=g, dtype=d.values.dtype))


CASES = [("bert", "q", 8), ("llama", "k", 8), ("gpt2", "v", 8), ("neox", "q", 8), ("bert", "v", 12), ("phi3", "v", 12),
         ("phi3", "up", 12), ("llama", "down", 8), ("gpt2", "up", 12)]  # MLP: a fused half, a Linear, a Conv1D


@pytest.mark.parametrize("arch,kind,b", CASES)
def test_block_gradients_equal_masked_dense_and_input_grad_exact(arch, kind, b):
    model = tiny(arch).double()
    target = find_targets(model, [kind])[0]
    (delta,) = attach.add_adapter(model, [target], "smt", heads=[], block_size=b, blocks=_some_blocks(target, b))
    _randomize(model)  # padding of ragged blocks gets values too: it must not leak into anything
    wrapper = model.get_submodule(target.module)
    x = torch.randn(2, 5, target.in_features, dtype=torch.float64, requires_grad=True)
    y = wrapper(x)
    w = torch.randn_like(y)
    (y * w).sum().backward()

    # Dense float64 reference: y = x W₀ᵀ + b, then x ΔWᵀ added to the slice's rows.
    x_ref = x.detach().clone().requires_grad_(True)
    dW = _dense_from_blocks(delta).requires_grad_(True)
    W0, bias = wrapper.weight_rows().detach(), wrapper.bias
    idx = target.rows.index()
    y_ref = (x_ref @ W0.T + (0 if bias is None else bias.detach())).index_add(-1, idx, x_ref @ dW.T)
    (y_ref * w).sum().backward()

    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)   # input gradient exact
    torch.testing.assert_close(delta.delta_weight(), dW.detach(), atol=0, rtol=0)  # the same blocks placed: exact
    R, C = target.shape
    for (r, c), g in zip(delta.blocks.tolist(), delta.values.grad):
        h, wd = min(b, R - r * b), min(b, C - c * b)
        torch.testing.assert_close(g[:h, :wd], dW.grad[r * b:r * b + h, c * b:c * b + wd], atol=1e-12, rtol=1e-12)
        assert not g[h:].any() and not g[:, wd:].any()  # ragged padding: exactly zero gradient


def test_saves_only_the_selected_input_columns():
    model = tiny("bert").double()
    target = find_targets(model, ["v"])[0]
    blocks = [{"module": target.module, "kind": "v", "row": r, "col": 1} for r in range(4)]  # one column block
    attach.add_adapter(model, [target], "smt", heads=[], block_size=8, blocks=blocks)
    wrapper = model.get_submodule(target.module)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(3, 7, 32, dtype=torch.float64, requires_grad=True)
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:  # parameters (W₀, the blocks) cost nothing extra
            saved.append(t.numel())
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        wrapper(x).sum().backward()
    assert sum(saved) == 3 * 7 * 8 == x.numel() // 4  # the 8 columns of column block 1, nothing else


def _all_blocks(targets, b):
    return [{"module": t.module, "kind": t.kind, "row": r, "col": c}
            for t in targets for r in range(_grid(t, b)[0]) for c in range(_grid(t, b)[1])]


def test_full_budget_trains_like_dense_step_for_step(ids):
    base = tiny("bert", 2).double()
    targets = find_targets(base, ["q", "v"])
    grads = {(t.module, t.kind): torch.randn(t.shape) for t in targets}
    sel = smt.select_blocks(grads, 12, n_blocks=10 ** 6)  # capped at every block there is
    assert len(sel) == len(_all_blocks(targets, 12))
    a, d = copy.deepcopy(base), copy.deepcopy(base)
    attach.add_adapter(a, smt.targets_of(a, sel), "smt", block_size=12, blocks=sel)
    attach.add_adapter(d, targets, "dense")
    opts = [torch.optim.AdamW(param_groups(m, TrainConfig(lr=1e-2, lr_ratio=2.0, weight_decay=0.1)))
            for m in (a, d)]
    labels = torch.tensor([0, 1, 1])
    for _ in range(4):
        for m, opt in zip((a, d), opts):
            loss = torch.nn.functional.cross_entropy(m(ids).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
        for (_, ds), (_, dd) in zip(attach.iter_deltas(a), attach.iter_deltas(d)):
            torch.testing.assert_close(ds.delta_weight(), dd.weight, atol=1e-12, rtol=1e-10)
            R, C = ds.target.shape  # the ragged padding (32 = 12+12+8) never moves under AdamW
            assert not ds.values[:, 8:, :][ds.blocks[:, 0] == 2].any()
            assert not ds.values[:, :, 8:][ds.blocks[:, 1] == 2].any()
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, d(ids).logits, atol=1e-12, rtol=1e-10)
    assert {g["name"]: g["lr"] for g in param_groups(a, TrainConfig(lr=1e-2, lr_ratio=2.0))}["v.blocks"] == 2e-2


def test_merge_unmerge_exact_and_export(ids):
    model = tiny("gpt2")
    targets = find_targets(model, ["q", "v", "up", "down"])
    sel = [e for t in targets for e in _some_blocks(t, 12, seed=len(t.kind))]
    attach.add_adapter(model, targets, "smt", block_size=12, blocks=sel)
    _randomize(model)
    with torch.no_grad():
        y = model(ids).logits
        before = {n: p.clone() for n, p in model.named_parameters()}
        attach.merge_adapter(model)
        torch.testing.assert_close(model(ids).logits, y, atol=1e-5, rtol=1e-4)
        attach.unmerge_adapter(model)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert torch.equal(model(ids).logits, y)  # unmerged again: y's path, bit-exact
        plain = attach.unwrap(model)
        torch.testing.assert_close(plain(ids).logits, y, atol=1e-5, rtol=1e-4)


def test_save_load_round_trip_and_index_validation(tmp_path, ids):
    model = tiny("llama", 2)
    targets = find_targets(model, ["q", "k", "v"])
    sel = [e for t in targets for e in _some_blocks(t, 12, seed=t.layer)]
    attach.add_adapter(model, smt.targets_of(model, sel), "smt", block_size=12, blocks=sel)
    _randomize(model)
    with torch.no_grad():
        y = model(ids).logits
    io.save_adapter(model, str(tmp_path))
    with open(tmp_path / io.QKV_CONFIG) as f:
        meta = json.load(f)
    assert meta["method"] == "smt" and meta["hparams"] == {"block_size": 12, "blocks": sel}
    from safetensors.torch import load_file
    tensors = load_file(str(tmp_path / io.QKV_WEIGHTS))
    assert any(k.endswith(".values") for k in tensors) and any(k.endswith(".blocks") for k in tensors)
    assert all(not v.is_floating_point() for k, v in tensors.items() if k.endswith((".blocks", ".shape")))

    fresh = tiny("llama", 2)
    io.load_adapter(fresh, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, y)  # reloaded: the same path

    # A selection in the JSON that disagrees with the saved indices is refused.
    meta["hparams"]["blocks"][0]["col"] = (meta["hparams"]["blocks"][0]["col"] + 1) % 3
    files.write_json(str(tmp_path / io.QKV_CONFIG), meta)
    with pytest.raises(io.AdapterError, match="indices"):
        io.load_adapter(tiny("llama", 2), str(tmp_path))


def test_bad_blocks_refused_by_the_delta():
    model = tiny("bert")
    t = find_targets(model, ["q"])[0]
    w = torch.zeros(32, 32)
    with pytest.raises(ValueError, match="outside"):
        BlockSparse(t, w, 12, [{"module": t.module, "kind": "q", "row": 3, "col": 0}])
    with pytest.raises(ValueError, match="twice"):
        BlockSparse(t, w, 12, [{"module": t.module, "kind": "q", "row": 0, "col": 0}] * 2)
    with pytest.raises(ValueError, match="no blocks"):
        BlockSparse(t, w, 12, [{"module": t.module, "kind": "v", "row": 0, "col": 0}])


# --- selection ---------------------------------------------------------------------------------------

def test_scores_against_hand_computation():
    g = torch.arange(25, dtype=torch.float64).reshape(5, 5) - 12  # 3×3 grid of 2×2 blocks, ragged edges
    blk = g[0:2, 2:4]
    corner = g[4:5, 4:5]
    edge = g[4:5, 0:2]
    s = smt.score_blocks(g, 2, "abs_mean")
    assert s.shape == (3, 3)
    assert math.isclose(s[0, 1], blk.abs().mean()) and math.isclose(s[2, 2], corner.abs().item())
    assert math.isclose(s[2, 0], edge.abs().mean())  # mean over its 2 real entries, not 4
    s = smt.score_blocks(g, 2, "mean_abs")
    assert math.isclose(s[0, 1], blk.mean().abs()) and math.isclose(s[2, 0], edge.mean().abs())
    s = smt.score_blocks(g, 2, "l2")
    assert math.isclose(s[0, 1], blk.norm()) and math.isclose(s[2, 0], edge.norm())
    with pytest.raises(ValueError, match="not one of"):
        smt.score_blocks(g, 2, "mean")


def test_budget_arithmetic():
    assert smt.block_budget(8, budget=0.01, total_params=100_000) == 15  # ⌊1000 / 64⌋
    assert smt.block_budget(8, budget=1e-6, total_params=100_000) == 1  # at least one
    assert smt.block_budget(8, n_blocks=7) == 7
    for bad in [dict(), dict(budget=0.1, n_blocks=3), dict(budget=1.5, total_params=10), dict(budget=0.1),
                dict(n_blocks=0)]:
        with pytest.raises(ValueError):
            smt.block_budget(8, **bad)


def test_global_vs_per_matrix_and_ties():
    # Matrix "a" is uniformly strong, "b" weak with one strong block: global picks all of a first.
    a = torch.full((4, 4), 5.0)
    b = torch.full((4, 4), 1.0)
    b[2:4, 0:2] = 9.0
    grads = {("m.0.a", "q"): a, ("m.0.b", "v"): b}
    glob = smt.select_blocks(grads, 2, n_blocks=3)
    assert [(e["kind"], e["row"], e["col"]) for e in glob] == [("q", 0, 0), ("q", 0, 1), ("v", 1, 0)]
    per = smt.select_blocks(grads, 2, n_blocks=3, per_matrix=True)  # quota 1 each, remainder global
    assert [(e["kind"], e["row"], e["col"]) for e in per] == [("q", 0, 0), ("q", 0, 1), ("v", 1, 0)]
    per = smt.select_blocks(grads, 2, n_blocks=4, per_matrix=True)  # quota 2 each
    assert sum(e["kind"] == "v" for e in per) == 2
    assert all(e["layer"] == 0 and isinstance(e["score"], float) for e in per)
    # Ties: flat (matrix, row, col) order, the same every time.
    flat = {("m.1.a", "q"): torch.ones(4, 4), ("m.1.b", "k"): torch.ones(4, 4)}
    first = smt.select_blocks(flat, 2, n_blocks=5)
    assert [(e["kind"], e["row"], e["col"]) for e in first] == [("q", 0, 0), ("q", 0, 1), ("q", 1, 0), ("q", 1, 1),
                                                                  ("k", 0, 0)]
    assert smt.select_blocks(flat, 2, n_blocks=5) == first
    assert len(smt.select_blocks(flat, 2, budget=0.25, total_params=64)) == 4


# --- warm-up -----------------------------------------------------------------------------------------

def test_warmup_sums_equal_per_batch_gradients():
    model = tiny("gpt2")  # fused c_attn: q and v slices of one Conv1D weight
    targets = find_targets(model, ["q", "v"])
    torch.manual_seed(5)
    batches = [{"input_ids": (x := torch.randint(2, 64, (2, 6))), "labels": x} for _ in range(3)]
    expected = {(t.module, t.kind): torch.zeros(t.shape) for t in targets}
    for batch in batches:
        for t in targets:
            w = model.get_submodule(t.module).weight
            (g,) = torch.autograd.grad(model(**batch).loss, w)
            expected[(t.module, t.kind)] += g.t()[t.rows.index()]
    flags = [p.requires_grad for p in model.parameters()]
    sums = smt.warmup_gradients(model, iter(batches), targets, 3, progress=False)
    assert set(sums) == set(expected)
    for k in sums:
        torch.testing.assert_close(sums[k], expected[k], atol=1e-6, rtol=1e-5)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters()) and not model.training

    # With update_lr, one SGD step lands on the target slices only (k's columns stay as they were).
    w = model.transformer.h[0].attn.c_attn.weight
    w0 = w.detach().clone()
    g = smt.warmup_gradients(model, iter(batches), targets, 1, update_lr=0.5, progress=False)
    torch.testing.assert_close(w[:, :32], w0[:, :32] - 0.5 * g[("transformer.h.0.attn.c_attn", "q")].t())
    assert torch.equal(w[:, 32:64], w0[:, 32:64])
    with pytest.raises(ValueError, match="ran out"):
        smt.warmup_gradients(model, iter(batches), targets, 4, progress=False)


def _dataset(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(2, 64, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(n)]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_prepare_smt_report_and_training(tmp_path, ids):
    model = tiny("bert", 2)
    kw = dict(batch_size=4, warmup_steps=4, block_size=8, budget=0.01, kinds=("q", "k", "v"), seed=1)
    state = torch.get_rng_state()
    sel = smt.prepare_smt(model, _dataset(), _collate, out_dir=str(tmp_path), progress=False, **kw)
    assert torch.equal(torch.get_rng_state(), state)  # training's random stream is untouched
    n_params = smt.count_parameters(model)
    assert len(sel) == math.floor(0.01 * n_params / 64)
    assert sel == smt.prepare_smt(tiny("bert", 2), _dataset(), _collate, progress=False, **kw)  # seeded
    assert sel == smt.load_selection(str(tmp_path / smt.SELECTION_FILE), 8)
    with open(tmp_path / smt.REPORT_JSON) as f:
        report = json.load(f)
    assert os.path.getsize(tmp_path / smt.REPORT_PNG) > 0
    assert report["n_blocks"] == len(sel) == sum(report["by_kind"].values()) == sum(report["by_layer"].values())
    assert sum(sum(v.values()) for v in report["by_kind_layer"].values()) == len(sel)
    assert report["parameters"] == 64 * len(sel)
    assert set(report["by_kind"]) == {"q", "k", "v"} and set(report["by_layer"]) == {"0", "1"}  # zeros shown
    assert report["eligible_blocks_by_kind"] == {"q": 32, "k": 32, "v": 32}  # 2 layers × (32/8)²

    attach.add_adapter(model, smt.targets_of(model, sel), "smt", block_size=8, blocks=sel)
    opt = torch.optim.AdamW(param_groups(model, TrainConfig(lr=1e-2)))
    model.train()
    losses = _train_steps(model, opt, _collate(_dataset()[:4]), 5)
    assert losses[-1] < losses[0]
    trainable = attach.trainable_parameters(model)[0] - sum(p.numel() for p in model.classifier.copies.parameters())
    assert trainable == 64 * len(sel)

    # A fixed selection is loaded (no warm-up) and checked against the model.
    fixed = smt.prepare_smt(tiny("bert", 2), None, None, selection_path=str(tmp_path / smt.SELECTION_FILE),
                            progress=False, **kw)
    assert fixed == sel


def _train_steps(model, opt, batch, steps: int) -> list[float]:
    """The losses of ``steps`` optimizer steps on one batch."""
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def _write(path, obj):
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("blocks,match", [
    ("{not json", "not valid JSON"),
    ([], "non-empty list"),
    ([{"module": "m.0.q", "kind": "q", "row": 0, "col": 0}, {"module": "m.0.q", "kind": "q", "row": 0}],
     "entry 1: field 'col'"),
    ([{"module": "m.0.q", "kind": "q", "row": 0, "col": 0}, {"module": "m.0.q", "kind": "q", "row": -1, "col": 0}],
     "entry 1: field 'row'"),
    ([{"module": "m.0.q", "kind": "q", "row": 0, "col": 0}] * 3, "entry 1: same block as entry 0"),
    ([{"module": "", "kind": "q", "row": 0, "col": 0}], "entry 0: field 'module'"),
    ([{"module": "m.0.q", "kind": "q", "row": 0, "col": 0, "score": "high"}], "entry 0: field 'score'"),
    ({"block_size": 64, "blocks": [{"module": "m.0.q", "kind": "q", "row": 0, "col": 0}]}, "block_size 64"),
])
def test_bad_selection_files_refused(tmp_path, blocks, match):
    path = _write(tmp_path / "sel.json", blocks)
    with pytest.raises(smt.SelectionError, match=match) as e:
        smt.load_selection(path, 8)
    assert path in str(e.value)


def test_selection_that_does_not_fit_the_model(tmp_path):
    model = tiny("bert", 2)
    q = "bert.encoder.layer.0.attention.self.query"
    for entry, match in [({"module": q, "kind": "q", "row": 4, "col": 0}, "entry 1: block \\(4, 0\\) is outside"),
                         ({"module": q + "x", "kind": "q", "row": 0, "col": 0}, "entry 1: the model has no slice")]:
        path = _write(tmp_path / "sel.json", [{"module": q, "kind": "q", "row": 0, "col": 0}, entry])
        with pytest.raises(smt.SelectionError, match=match):
            smt.prepare_smt(model, None, None, batch_size=1, warmup_steps=1, block_size=8, selection_path=path)


def test_warmup_with_updates_selects_along_a_trajectory_and_restores_the_weights():
    """smt_warmup_lr: the warm-up takes SGD steps (later gradients differ from those at the pretrained weights,
    so the selection can change), then puts every weight back."""
    kw = dict(batch_size=4, warmup_steps=6, block_size=8, budget=6, kinds=("q", "k", "v"), seed=1, progress=False)
    model = tiny("bert", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moved = smt.prepare_smt(model, _dataset(), _collate, warmup_lr=5.0, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    still = smt.prepare_smt(tiny("bert", 2), _dataset(), _collate, **kw)
    assert [b["score"] for b in moved] != [b["score"] for b in still]  # the updates changed the gradients seen
    # the same selection as a warm-up by hand: SGD steps kept, sums scored, weights restored
    hand = tiny("bert", 2)
    targets = smt.eligible_targets(hand, ("q", "k", "v"))
    loader = torch.utils.data.DataLoader(_dataset(), batch_size=4, shuffle=True, collate_fn=_collate,
                                         generator=torch.Generator().manual_seed(1))
    with torch.random.fork_rng():
        torch.manual_seed(1)
        sums = smt.warmup_gradients(hand, smt._cycle(loader), targets, 6, update_lr=5.0, progress=False)
    ref = smt.select_blocks(sums, 8, n_blocks=6, total_params=smt.count_parameters(hand))
    assert [(b["module"], b["row"], b["col"]) for b in ref] == [(b["module"], b["row"], b["col"]) for b in moved]


def test_warmup_with_the_head_training_keeps_the_head_and_changes_the_gradients():
    """smt_warmup_head: the new task head takes the warm-up's SGD steps (the paper's warm-up fine-tunes it too) and
    keeps them, the slices are put back; later batches' gradients flow through a head that is learning, so the
    block scores differ from a warm-up through the random head. The key needs smt_warmup_lr."""
    from qkvtune.config import ConfigError, build_config

    kw = dict(batch_size=4, warmup_steps=6, block_size=8, budget=6, kinds=("q", "k", "v"), seed=1, progress=False,
              warmup_lr=5.0)
    model = tiny("bert", 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with_head = smt.prepare_smt(model, _dataset(), _collate, heads=[model.classifier], **kw)
    after = model.state_dict()
    moved = [k for k in after if not torch.equal(after[k], before[k])]
    assert moved and all(k.startswith("classifier.") for k in moved)  # only the head changed, and it stays changed
    random_head = smt.prepare_smt(tiny("bert", 2), _dataset(), _collate, **kw)
    assert [b["score"] for b in with_head] != [b["score"] for b in random_head]
    with pytest.raises(ConfigError, match="smt_warmup_head.*smt_warmup_lr"):
        build_config({"method": "smt", "smt_warmup_head": True})


def test_mlp_kinds_are_eligible_selected_and_trained(tmp_path):
    """smt_targets [v, mlp]: the warm-up scores v and every MLP kind of the model (gate, up, down on Llama), the
    report offers their blocks, the selected MLP blocks train, and a selection file naming the MLP kinds the old
    way (mlp_up …) still loads."""
    def causal(n=12, seed=0):
        g = torch.Generator().manual_seed(seed)
        return [{"input_ids": (x := torch.randint(2, 64, (6,), generator=g)), "labels": x} for _ in range(n)]

    model = tiny("llama")
    eligible = smt.eligible_targets(model, ("v", "mlp"))
    assert {t.kind for t in eligible} == {"v", "gate", "up", "down"} and len(eligible) == 3 * 4
    kw = dict(batch_size=4, warmup_steps=3, block_size=8, budget=30, kinds=("v", "mlp"), seed=0, progress=False)
    sel = smt.prepare_smt(model, causal(), _collate, out_dir=str(tmp_path), **kw)
    with open(tmp_path / smt.REPORT_JSON) as f:
        report = json.load(f)
    # 3 layers: v 16×32 → 2×4 blocks, gate and up 48×32 → 6×4, down 32×48 → 4×6
    assert report["eligible_blocks_by_kind"] == {"v": 24, "gate": 72, "up": 72, "down": 72}
    assert set(report["by_kind"]) == {"v", "gate", "up", "down"} and len(sel) == 30
    assert {e["kind"] for e in sel} & {"gate", "up", "down"}
    attach.add_adapter(model, smt.targets_of(model, sel), "smt", block_size=8, blocks=sel)
    opt = torch.optim.AdamW(param_groups(model, TrainConfig(lr=1e-2, lr_mlp_ratio=2)))
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {f"{k}.blocks": 1e-2 if k == "v" else 2e-2
                                                            for k in {e["kind"] for e in sel}}
    losses = _train_steps(model, opt, _collate(causal(4, seed=1)), 4)
    assert losses[-1] < losses[0]
    legacy = [{**e, "kind": "mlp_" + e["kind"] if e["kind"] != "v" else "v"} for e in sel]
    path = _write(tmp_path / "legacy.json", {"block_size": 8, "blocks": legacy})
    assert smt.prepare_smt(tiny("llama"), None, None, selection_path=path, **kw) == sel
