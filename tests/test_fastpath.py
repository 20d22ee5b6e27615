"""The fast path changes only where dropout masks come from: the masks' bits and keep rate (binomial
bounds), the 1/(1 − p) scaling, the attention with fast dropout against eager math with the same mask,
eval-mode logits and gradients equal to eager, and adapters that still merge, save and load."""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import tiny
from qkvtune import attach, fastpath, io
from qkvtune.targets import find_targets

SIGMAS = 6  # binomial bounds: a false alarm is ~1e-9 per check


def _within_binomial(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= SIGMAS * math.sqrt(n * p * (1 - p))


def test_random_words_cover_all_64_bits():
    torch.manual_seed(0)
    n = 1 << 16
    words = torch.empty(n, dtype=torch.int64).random_(-2**63, None)
    for bit in range(64):
        ones = int(((words >> bit) & 1).sum())
        assert _within_binomial(ones, n, 0.5), f"bit {bit}: {ones} of {n}"


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.013])
def test_keep_rate_matches_one_minus_p(p):
    torch.manual_seed(1)
    shape = (7, 3, 1001)  # not a multiple of 4 lanes: the tail of the last word is unused
    n, draws = 7 * 3 * 1001, 20
    keep = 1 - round(p * 65536) / 65536
    assert abs(keep - (1 - p)) <= 2 ** -17
    kept = sum(int(fastpath.keep_mask(shape, p).sum()) for _ in range(draws))
    assert _within_binomial(kept, n * draws, keep)
    # each 16-bit lane of a word on its own, too (lane 0 of every word, then lane 3)
    lanes = torch.stack([fastpath.keep_mask((4 * 5000,), p).view(-1, 4) for _ in range(draws)])
    for lane in range(4):
        assert _within_binomial(int(lanes[..., lane].sum()), 5000 * draws, keep), lane


def test_fast_dropout_scales_kept_values_and_gradient():
    torch.manual_seed(2)
    p = 0.3
    x = torch.randn(64, 257, requires_grad=True)
    drop = fastpath.FastDropout(p).train()
    y = drop(x)
    kept = y != 0
    assert torch.equal(y[kept], (x * (1 / (1 - p)))[kept])  # one multiplication either way: bit-exact
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))
    # unbiased: E[y] = x, checked through the keep count of a constant input
    ones = torch.ones(200_000)
    assert _within_binomial(int((drop(ones) != 0).sum()), ones.numel(), 1 - round(p * 65536) / 65536)
    assert torch.equal(drop.eval()(x), x) and torch.equal(fastpath.fast_dropout(x, 0.0), x)


def _attention_module(causal: bool, groups: int):
    m = nn.Module()
    m.is_causal, m.num_key_value_groups = causal, groups
    return m.train()


@pytest.mark.parametrize("causal,groups,mask_kind", [(False, 1, "additive"), (False, 1, "bool"), (True, 2, None)])
def test_attention_with_fast_dropout_equals_eager_math_with_that_mask(causal, groups, mask_kind):
    torch.manual_seed(3)
    B, H, L, D, p = 2, 4, 6, 8, 0.25
    q = torch.randn(B, H, L, D)
    k, v = torch.randn(B, H // groups, L, D), torch.randn(B, H // groups, L, D)
    keep_pos = torch.rand(B, 1, 1, L) > 0.3
    keep_pos[..., 0] = True
    mask = {"additive": torch.where(keep_pos, 0.0, torch.finfo(torch.float32).min), "bool": keep_pos, None: None}[mask_kind]
    fast = fastpath._make_fast_attention("sdpa")
    torch.manual_seed(4)
    out, _ = fast(_attention_module(causal, groups), q, k, v, mask, dropout=p, scaling=0.3)
    torch.manual_seed(4)
    drop = fastpath.keep_mask((B, H, L, L), p)
    kr, vr = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ kr.transpose(2, 3) * 0.3
    allowed = keep_pos if mask_kind else torch.ones(L, L, dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
    ref = ((probs * drop / (1 - p)) @ vr).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def _dropout_bert(num_labels=2):
    model = tiny("bert", num_labels=num_labels)
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.1
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.1
    return model


def _lora(model):
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        for _, d in attach.iter_deltas(model):
            d.lora_B.normal_(0, 0.1)
    return model


def _logits_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # a padded row: the fast attention must build the padding mask as its base does
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_eval_mode_logits_and_gradients_equal_eager(ids):
    eager = _lora(_dropout_bert())
    fast = copy.deepcopy(eager)
    changed = fastpath.enable(fast)
    assert any("dropout" in c for c in changed) and any("attention" in c for c in changed)
    assert sum(isinstance(m, fastpath.FastDropout) for m in fast.modules()) == sum(
        type(m) is nn.Dropout for m in eager.modules())
    labels = torch.tensor([0, 1, 1])
    for model in (eager, fast):
        model.eval()
    (le, ge), (lf, gf) = _logits_and_grads(eager, ids, labels), _logits_and_grads(fast, ids, labels)
    torch.testing.assert_close(lf, le, atol=1e-5, rtol=1e-5)
    assert ge.keys() == gf.keys()
    for n in ge:
        torch.testing.assert_close(gf[n], ge[n], atol=1e-5, rtol=1e-5)


def _train_logits(model, ids, seed=5):
    torch.manual_seed(seed)
    return model.train()(input_ids=ids).logits


def test_train_mode_dropout_is_live_and_disable_restores_eager(ids):
    model = _lora(_dropout_bert())
    eager = copy.deepcopy(model)
    fastpath.enable(model)
    a, b = _train_logits(model, ids), _train_logits(model, ids, seed=6)
    assert not torch.equal(a, b)  # masks are drawn
    assert not torch.equal(a, _train_logits(eager, ids))  # from another random stream than eager's
    fastpath.disable(model)
    assert not any(isinstance(m, fastpath.FastDropout) for m in model.modules())
    # eager again, attention included: the same seed draws the same masks as a copy that never had the fast path
    assert torch.equal(_train_logits(model, ids), _train_logits(eager, ids))  # same modules, same masks: same path
    assert not hasattr(model, "qkvtune_fastpath")


def test_llama_without_dropout_is_left_alone(ids):
    model = tiny("llama")
    untouched = copy.deepcopy(model)
    assert fastpath.enable(model) == []
    assert torch.equal(_train_logits(model, ids), _train_logits(untouched, ids))  # left alone: the same path


def test_merge_save_load_with_fast_path_on(ids, tmp_path):
    model = _lora(_dropout_bert())
    fastpath.enable(model)
    model.eval()
    unmerged = model(input_ids=ids).logits
    attach.merge_adapter(model)
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    attach.unmerge_adapter(model)
    torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-6, rtol=1e-6)
    io.save_adapter(model, str(tmp_path / "a"))
    fresh = _dropout_bert()
    fastpath.enable(fresh)
    io.load_adapter(fresh, str(tmp_path / "a"))
    torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_resolve_modes():
    assert fastpath.resolve("off", cuda=False) is None and fastpath.resolve("off", cuda=True) is None
    assert fastpath.resolve("auto", cuda=False) == {"compile": False}
    assert fastpath.resolve("auto", cuda=True) is None
    assert fastpath.resolve("on", cuda=True) == {"compile": True}


def test_config_key_is_validated():
    from qkvtune.config import ConfigError, build_config

    assert build_config({}).fast_path == "auto"
    assert build_config({"fast_path": "off"}).fast_path == "off"
    with pytest.raises(ConfigError, match="fast_path"):
        build_config({"fast_path": "fast"})
