"""Empirical NTK: the batched hook kernel equals explicit per-example autograd (float64, 1e-6) for base weights of
every kind, fused GPT-2 slices and Phi-3's MLP halves (their rows only) and adapter delta parameters; padding
contributes nothing; per-kind kernels add up to the union; sketching keeps eigenvalues in its stated band;
spectrum summaries."""

import pytest
import torch

from conftest import tiny
from qkvtune import attach
from qkvtune.analysis import AnalysisError
from qkvtune.analysis.kernel_regression import kernel_logistic, kernel_predictions, kernel_ridge, loo_ridge
from qkvtune.analysis.ntk import SRHT, KronSketch, effective_dimension, empirical_ntk, fit_decay
from qkvtune.targets import find_targets

LENGTHS = [5, 7, 3, 7, 6, 4]


def _data(lengths=LENGTHS, seed=0, pad_id=0):
    """Unpadded single examples and the same examples right-padded into one batch."""
    g = torch.Generator().manual_seed(seed)
    singles = [torch.randint(2, 64, (1, n), generator=g) for n in lengths]
    t = max(lengths)
    batch = {"input_ids": torch.full((len(lengths), t), pad_id),
             "attention_mask": torch.zeros(len(lengths), t, dtype=torch.long)}
    for i, ids in enumerate(singles):
        batch["input_ids"][i, :ids.shape[1]] = ids[0]
        batch["attention_mask"][i, :ids.shape[1]] = 1
    return singles, batch


def _explicit(model, singles, params, f, take=lambda g: g):
    """K from one torch.autograd.grad call per example and output (no batching, no padding)."""
    for p in params:
        p.requires_grad_(True)
    rows = []
    for ids in singles:
        out = f(model(input_ids=ids, attention_mask=torch.ones_like(ids)))
        per_output = []
        for c in range(len(out)):
            g = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            per_output.append(torch.cat([take(torch.zeros_like(p) if x is None else x).reshape(-1)
                                         for x, p in zip(g, params)]))
        rows.append(torch.stack(per_output))
    g = torch.stack(rows)  # (n, C, P)
    return torch.einsum("icp,jcp->ij", g, g)


def _margin(out):
    return (out.logits[0, 1] - out.logits[0, 0])[None]


def test_weight_kernel_matches_explicit_autograd_and_kinds_add_up():
    model = tiny("bert", 2).double()
    singles, batch = _data()
    kinds = ["q", "k", "v", "o"]
    weights = [model.get_submodule(t.module).weight for t in find_targets(model, kinds)]
    ref = _explicit(model, singles, weights, _margin)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    res = empirical_ntk(model, batch, targets=find_targets(model, kinds), chunk_size=4)  # two chunks, padded
    assert flags == [p.requires_grad for p in model.parameters()] and model.training  # left as found
    assert (res.kernel - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert sorted(res.per_kind) == sorted(kinds)
    assert torch.allclose(sum(res.per_kind.values()), res.kernel, rtol=0, atol=1e-15)
    v_only = empirical_ntk(model, batch, targets=find_targets(model, "v"), chunk_size=3)
    assert torch.allclose(v_only.kernel, res.per_kind["v"], rtol=1e-12, atol=0)
    assert res.f0.shape == (len(LENGTHS), 1) and res.labels is None


def test_padding_contributes_nothing():
    model = tiny("bert", 2).double()
    singles, batch = _data()
    res = empirical_ntk(model, batch, targets=find_targets(model, ["q", "v"]), chunk_size=6)
    # the same examples padded much further, pad positions filled with ordinary token ids
    wide = {k: torch.nn.functional.pad(v, (0, 9)) for k, v in batch.items()}
    wide["input_ids"][wide["attention_mask"] == 0] = 17
    res_wide = empirical_ntk(model, wide, targets=find_targets(model, ["q", "v"]), chunk_size=6)
    assert torch.allclose(res.kernel, res_wide.kernel, rtol=1e-10, atol=0)
    one_by_one = empirical_ntk(model, [{"input_ids": s[0]} for s in singles], targets=find_targets(model, ["q", "v"]), chunk_size=1,
                               collator=lambda ex: {"input_ids": ex[0]["input_ids"][None]})
    assert torch.allclose(res.kernel, one_by_one.kernel, rtol=1e-10, atol=0)


def test_gpt2_fused_slice_uses_only_its_rows_and_label_word_logits():
    model = tiny("gpt2").double()
    singles, batch = _data()
    words = [5, 9]
    for kind in ("q", "k", "v"):
        targets = find_targets(model, [kind])
        r = targets[0].rows
        weights = [model.get_submodule(t.module).weight for t in targets]  # Conv1D: (in, 3d), columns = outputs
        ref = _explicit(model, singles, weights, lambda out: out.logits[0, -1, words],
                        take=lambda g: g[:, r.start:r.start + r.width])
        res = empirical_ntk(model, batch, targets=find_targets(model, [kind]), output="logits", label_token_ids=words, chunk_size=4)
        assert (res.kernel - ref).abs().max() <= 1e-6 * ref.abs().max(), kind
        assert res.per_output.shape == (2, len(LENGTHS), len(LENGTHS))
        assert torch.allclose(res.per_output.sum(0), res.kernel)
    with pytest.raises(AnalysisError, match="label_token_ids"):
        empirical_ntk(model, batch, targets=find_targets(model, ["v"]), output="logits")


def test_mlp_kinds_kernels_match_explicit_autograd_on_their_rows():
    """Per-kind kernels of the MLP: Phi-3's gate and up (the two halves of one fused gate_up_proj) and down, each
    equal to explicit autograd restricted to its rows, and together to the kernel of all three."""
    model = tiny("phi3").double()
    singles, batch = _data()
    words = [5, 9]
    f = lambda out: out.logits[0, -1, words]  # noqa: E731
    half = model.config.intermediate_size
    for kind, take in (("gate", lambda g: g[:half]), ("up", lambda g: g[half:]), ("down", lambda g: g)):
        targets = find_targets(model, [kind])
        weights = [model.get_submodule(t.module).weight for t in targets]
        ref = _explicit(model, singles, weights, f, take=take)
        res = empirical_ntk(model, batch, targets=targets, output="logits", label_token_ids=words, chunk_size=4)
        assert (res.kernel - ref).abs().max() <= 1e-6 * ref.abs().max(), kind
    res = empirical_ntk(model, batch, targets=find_targets(model, "mlp"), output="logits", label_token_ids=words)
    assert sorted(res.per_kind) == ["down", "gate", "up"]
    assert torch.allclose(sum(res.per_kind.values()), res.kernel, rtol=0, atol=1e-12 * float(res.kernel.abs().max()))


@pytest.mark.parametrize("method", ["lora", "dora", "dense", "smt"])
def test_adapter_delta_kernel_matches_explicit_autograd(method):
    model = tiny("bert", 2).double()
    targets = find_targets(model, ["q", "v"])
    hp = {"dense": {}, "lora": {"rank": 2, "alpha": 4}, "dora": {"rank": 2, "alpha": 4},
          "smt": {"block_size": 16, "blocks": [{"module": t.module, "kind": t.kind, "row": r, "col": c}
                                               for t in targets for r, c in ((0, 1), (1, 0))]}}[method]
    attach.add_adapter(model, targets, method, **hp)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # leave initialisation (LoRA's B = 0 would zero the A gradients)
        for _, d in attach.iter_deltas(model):
            for p in d.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    singles, batch = _data()
    params = [p for _, d in attach.iter_deltas(model) for p in d.parameters()]
    ref = _explicit(model, singles, params, _margin)
    res = empirical_ntk(model, batch, adapter="default", chunk_size=4)
    assert (res.kernel - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert res.meta["parameters"] == sum(p.numel() for p in params)
    only_v = empirical_ntk(model, batch, adapter="default", targets=find_targets(model, "v"), chunk_size=4)
    assert torch.allclose(only_v.kernel, res.per_kind["v"])
    # the base-weight kernel still works on the wrapped model (hooks on the frozen projection)
    weights = [model.get_submodule(t.module).base.weight for t in find_targets(model, ["q"])]
    ref_w = _explicit(model, singles, weights, _margin)
    res_w = empirical_ntk(model, batch, targets=find_targets(model, "q"), chunk_size=4)
    assert (res_w.kernel - ref_w).abs().max() <= 1e-6 * ref_w.abs().max()


def test_sketch_keeps_eigenvalues_within_stated_band():
    model = tiny("bert", 2).double()
    _, batch = _data([6, 5, 7, 4, 6, 7, 3, 5, 6, 7], seed=2)
    exact = empirical_ntk(model, batch, targets=find_targets(model, ["q", "v", "o"]), chunk_size=5)
    for seed in range(3):
        sk = empirical_ntk(model, batch, targets=find_targets(model, ["q", "v", "o"]), chunk_size=5, sketch_dim=512, seed=seed)
        lo, hi = sk.meta["sketch_band"]
        keep = exact.eigenvalues > 1e-9 * exact.eigenvalues[0]
        ratio = sk.eigenvalues[keep] / exact.eigenvalues[keep]
        assert (ratio >= lo).all() and (ratio <= hi).all(), (ratio, lo, hi)
        assert abs(float(sk.kernel.trace() / exact.kernel.trace()) - 1) < 0.15


def test_kron_sketch_is_the_sketched_gradient_and_unbiased():
    """The Kronecker sketch, computed from thin products without forming any gradient, equals S_o·G·S_iᵀ of
    each example's explicit autograd gradient G (the same sketch matrices); averaged over sketches it is the
    exact kernel (unbiased), which one sketch is not."""
    model = tiny("bert", 2).double()
    singles, batch = _data()
    targets = find_targets(model, ["q", "v"])
    k = 36
    sk = empirical_ntk(model, batch, targets=targets, chunk_size=4, sketch_dim=k, sketch="kron", seed=3)
    assert sk.meta["sketch"] == "kron" and "sketch_band" not in sk.meta
    weights = [model.get_submodule(t.module).weight for t in targets]
    for w in weights:
        w.requires_grad_(True)
    grads = [torch.autograd.grad(_margin(model(input_ids=ids, attention_mask=torch.ones_like(ids)))[0], weights)
             for ids in singles]  # per example, per target: the explicit (out, in) gradient

    def sketched(seed):  # (n, Σ k) features: each target's gradient sketched by KronSketch(seed + its index)
        sketches = [KronSketch(t.rows.size, t.in_features, k, seed + i) for i, t in enumerate(targets)]
        return torch.stack([torch.cat([(s.s_out.double() @ g @ s.s_in.double().T).reshape(-1)
                                       for s, g in zip(sketches, per_target)]) for per_target in grads])

    feats = sketched(3)
    torch.testing.assert_close(sk.kernel, feats @ feats.T, rtol=1e-9, atol=1e-12)
    flat = torch.stack([torch.cat([g.reshape(-1) for g in per_target]) for per_target in grads])
    exact = flat @ flat.T
    torch.testing.assert_close(empirical_ntk(model, batch, targets=targets).kernel, exact, rtol=1e-9, atol=1e-12)
    grams = [(lambda f: f @ f.T)(sketched(s)) for s in range(1000, 1000 + 7 * 400, 7)]  # no seed shared
    err = lambda a: float((a - exact).norm() / exact.norm())  # noqa: E731
    # unbiased: the mean's error keeps falling like 1/√N (16× the sketches, ~4× less error); a bias would stay
    assert err(sum(grams) / 400) < 0.1 and err(sum(grams) / 400) < err(sum(grams[:25]) / 25) / 2.5
    with pytest.raises(AnalysisError, match="sketch"):
        empirical_ntk(model, batch, targets=targets, sketch_dim=k, sketch="gauss")


def test_srht_is_an_isometry_in_expectation():
    x = torch.randn(3, 300, dtype=torch.float64)
    grams = torch.stack([(lambda s: s @ s.T)(SRHT(300, 64, seed)(x)) for seed in range(300)])
    assert torch.allclose(grams.mean(0), x @ x.T, rtol=0.05, atol=0.05 * float((x @ x.T).diagonal().mean()))
    full = SRHT(300, 512, 0)(x)  # k = m: an orthogonal transform
    assert torch.allclose(full @ full.T, x @ x.T)


def test_decay_fit_and_effective_dimension():
    i = torch.arange(1, 201, dtype=torch.float64)
    p, rng = fit_decay(3.0 * i ** -1.7)
    assert p == pytest.approx(1.7, abs=1e-9) and rng == (2, 100)
    assert fit_decay(i ** -1.0, lo=1, hi=50) == (pytest.approx(1.0), (1, 50))
    assert effective_dimension(torch.tensor([2.0] * 7 + [0.0] * 3)) == pytest.approx(7)
    assert effective_dimension(torch.tensor([1.0, 1.0]), ridge=1.0) == pytest.approx(1.0)


def test_kernel_regression_on_a_linear_kernel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)
    y = x @ w
    k = x @ x.T
    pred = kernel_ridge(k[:60, :60], y[:60], k[60:, :60], ridge=1e-8)
    assert torch.allclose(pred[:, 0], y[60:], atol=1e-5)
    # residual targets: predictions start from f0
    f0 = torch.full((80,), 3.0, dtype=torch.float64)
    pred = kernel_ridge(k[:60, :60], y[:60] + 3, k[60:, :60], ridge=1e-8, f0_train=f0[:60], f0_test=f0[60:])
    assert torch.allclose(pred[:, 0], y[60:] + 3, atol=1e-5)
    labels = (y > 0).long()
    logits = kernel_logistic(k[:60, :60], labels[:60], k[60:, :60], ridge=1e-4)
    assert float(((logits[:, 0] > 0).long() == labels[60:]).double().mean()) >= 0.9
    noisy = y + 0.3 * torch.randn(80, generator=g, dtype=torch.float64)
    assert loo_ridge(k, noisy)["sigma"] == pytest.approx(0.3, rel=0.35)


def test_kernel_predictions_on_a_tiny_model():
    model = tiny("bert", 3).double()
    _, batch = _data([6] * 24, seed=3)
    batch["labels"] = torch.arange(24) % 3
    res = empirical_ntk(model, batch, targets=find_targets(model, ["v", "o"]), output="logits", chunk_size=8)
    assert res.per_output.shape == (3, 24, 24) and res.labels.tolist() == batch["labels"].tolist()
    part = res.subset(range(5, 12))
    # bit-exact: a subset is the same entries picked out, no arithmetic
    assert torch.equal(part.kernel, res.kernel[5:12, 5:12]) and part.labels.tolist() == res.labels[5:12].tolist()
    assert torch.equal(part.per_output, res.per_output[:, 5:12, 5:12]) and len(part.eigenvalues) == 7
    for method in ("ridge", "logistic"):
        out = kernel_predictions(res, 16, method=method)
        assert 0 <= out["accuracy"] <= 1 and out["predictions"].shape == (8, 3)
    with pytest.raises(AnalysisError, match="n_train"):
        kernel_predictions(res, 24)
