"""The claims suite's measures can fail (issue 25): each check is run on adapters constructed to have, or to lack,
the property it names, and must not hold where the property is absent — φ on what training moved (B; a shared
initialisation of A must not pass for an overlap), the other-seed and shuffled-label controls, the bottom
directions, amplification on B·(A − A₀) (W's own bottom directions fail; a smaller control with the same
directions is no longer "beaten" just for its norm), the head-only baseline ("adapter not learned"), and the
stopping rule's per-seed requirements."""

import json
import math
import os
import shutil

import pytest
import torch

from conftest import data_dir
from qkvtune import io
from qkvtune.attach import iter_deltas
from qkvtune.bench import measures, runner
from qkvtune.bench import verdicts as V
from qkvtune.bench.claims import ClaimResult, evaluate_check, head_only_check
from qkvtune.bench.suite import Claim
from qkvtune.config import build_config
from qkvtune.files import read_json
from qkvtune.runs import open_run
from qkvtune.train import train

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    """Tiny LoRA runs on q and v (rank 2 and 4, as the suite trains them); ``still``: a run whose rate is so small
    that A never left its initialisation."""
    out = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, rank, lr in (("r2", 2, 1e-2), ("r4", 4, 1e-2), ("still", 2, 1e-9)):
        train(build_config(dict(model=tiny_bert_dir, task="glue/sst2", data_dir=data_dir(), max_train_samples=32,
                                val_size=8, max_eval_samples=16, max_steps=4, batch_size=8, eval_strategy="no", warmup_ratio=0.0,
                                targets=["q", "v"], rank=rank, alpha=2 * rank, lr=lr, output_dir=str(out / name))))
        dirs[name] = str(out / name)
    return dirs


def _edit(src: str, dst: str, fn) -> runner.SuiteRun:
    """A copy of run ``src`` at ``dst`` whose deltas ``fn(delta)`` rewrote; as the suite's Run."""
    shutil.copytree(src, dst)
    opened = open_run(dst, with_task=False)
    settings = read_json(os.path.join(dst, io.QKV_CONFIG))["settings"]
    with torch.no_grad():
        for _, d in iter_deltas(opened.model, opened.adapter):
            fn(d)
    io.save_adapter(opened.model, dst, extra=settings)
    return runner.SuiteRun("glue/sst2", "a", 0, dst, {}, math.nan, math.nan, [], 0.0)


def _unit(n, g):
    v = torch.randn(n, generator=g)
    return v / v.norm()


def _verdict(rule, values, threshold=None, margin=0.0):
    return V.judge(rule, V.t_interval(values), margin, threshold)


@needs_data
def test_the_initialisation_is_rebuilt_from_the_run_seed(trained):
    """A − A₀ is what training moved: zero for a run whose A never moved, though A itself is far from zero."""
    moved = measures.moved_factors(runner.SuiteRun("glue/sst2", "a", 0, trained["still"], {}, 0, 0, [], 0))
    assert moved and all(float(f["A_moved"].abs().max()) < 1e-6 < float(f["A"].abs().max()) for f in moved.values())
    moved = measures.moved_factors(runner.SuiteRun("glue/sst2", "a", 0, trained["r2"], {}, 0, 0, [], 0))
    assert all(float(f["A_moved"].abs().max()) > 1e-5 for f in moved.values())


@needs_data
def test_phi_on_B_fails_without_a_shared_direction_and_is_not_fooled_by_a_shared_A(trained, tmp_path):
    """φ(1,1) > 0.5: holds for B factors that share their top direction, does not hold for random ones — and an A
    shared by both adapters (what one seed's initialisation gives) passes on side A while side B stays low."""
    def shared(seed, top):
        g = torch.Generator().manual_seed(seed)
        u = {}

        def fn(d):
            out, r = d.lora_B.shape
            key = d.target.name
            u.setdefault(key, _unit(out, torch.Generator().manual_seed(hash(key) % 1000)))
            d.lora_B.copy_(0.01 * torch.randn(out, r, generator=g))
            if top:
                d.lora_B[:, 0] += u[key]
            d.lora_A.copy_(torch.ones_like(d.lora_A) + 0.01 * torch.randn(d.lora_A.shape, generator=g))
        return fn

    values = {True: [], False: []}
    side_a = []
    for top in (True, False):
        for seed in range(3):
            a = _edit(trained["r2"], str(tmp_path / f"a{top}{seed}"), shared(10 * seed, top))
            b = _edit(trained["r4"], str(tmp_path / f"b{top}{seed}"), shared(10 * seed + 1, top))
            q = measures.subspace({"glue/sst2": {"r2": a, "r4": b}}, "r2", "r4", side="B",
                                  other={"glue/sst2": {"r4": b}})
            values[top].append(q["phi_top1_other_seed:q"])
            if not top:
                side_a.append(measures.subspace({"glue/sst2": {"r2": a, "r4": b}}, "r2", "r4", side="A")["phi_top1:q"])
    assert _verdict("above", values[True], 0.5) == V.HOLDS
    assert _verdict("above", values[False], 0.5) == V.FAILS  # random B: no shared direction, the check fails
    assert _verdict("above", side_a, 0.5) == V.HOLDS  # v2's side A "overlaps" through the shared initialisation alone
    # above the shuffled-label pair: a control pair that shares the direction as much is not beaten
    assert _verdict("better", [x - y for x, y in zip(values[True], values[True])]) != V.HOLDS
    assert _verdict("better", [x - y for x, y in zip(values[True], values[False])]) == V.HOLDS


@needs_data
def test_bottom_directions_check_fails_when_the_larger_adapter_holds_them(trained, tmp_path):
    """ψ_bottom/random < 2: holds when the r=4 adapter's subspace misses the r=2 adapter's bottom direction, fails
    when the r=4 adapter spans all of the r=2 one (then the ratio is d/r = 8)."""
    basis = {}

    def small(d):
        g = torch.Generator().manual_seed(hash(d.target.name) % 997)
        q, _ = torch.linalg.qr(torch.randn(d.lora_B.shape[0], 8, generator=g))
        basis[d.target.name] = q
        d.lora_B.copy_(q[:, :2] * torch.tensor([2.0, 1.0]))

    def holds_all(d):
        d.lora_B.copy_(basis[d.target.name][:, :4])

    def misses(d):
        d.lora_B.copy_(basis[d.target.name][:, 4:8])

    ratios = {}
    for name, fn in (("holds", holds_all), ("misses", misses)):
        a = _edit(trained["r2"], str(tmp_path / f"a-{name}"), small)
        b = _edit(trained["r4"], str(tmp_path / f"b-{name}"), fn)
        q = measures.subspace({"glue/sst2": {"r2": a, "r4": b}}, "r2", "r4", side="B")
        ratios[name] = q["psi_bottom_over_random:v"]
    assert ratios["holds"] == pytest.approx(32 / 4)
    assert _verdict("below", [ratios["holds"]] * 3, 2.0) == V.FAILS
    assert _verdict("below", [ratios["misses"] + e for e in (0, 1e-3, 2e-3)], 2.0) == V.HOLDS


@needs_data
def test_amplification_on_what_moved_can_fail_and_ignores_the_update_norm(trained, tmp_path):
    """On M = s·B·(A − A₀): directions that are W's top ones are in W far more than random (holds); W's bottom
    ones far less (the check fails). A control with the same directions and a 3× smaller update has a 3× smaller
    factor — v2's "exceeds the control" held on that alone — but the same dirs_over_random, so the v3 check on
    it does not hold."""
    base = measures.moved_factors(runner.SuiteRun("glue/sst2", "a", 0, trained["r2"], {}, 0, 0, [], 0))
    weights = {}
    opened = open_run(trained["r2"], with_task=False)
    for wrapper, d in iter_deltas(opened.model, opened.adapter):
        weights[d.target.name] = wrapper.slice_weight(d.target.rows).detach().double()

    def aligned(which, scale=1.0):
        def fn(d):
            u, s, vh = torch.linalg.svd(weights[d.target.name])
            pick = slice(0, 2) if which == "top" else slice(-2, None)
            a0 = base[d.target.name]["A"] - base[d.target.name]["A_moved"]
            d.lora_A.copy_((a0 + 0.5 * vh[pick]).to(d.lora_A.dtype))
            d.lora_B.copy_((scale * u[:, pick]).to(d.lora_B.dtype))
        return fn

    out = {}
    for name, fn in (("top", aligned("top")), ("bottom", aligned("bottom")), ("small", aligned("top", 1 / 3))):
        run = _edit(trained["r2"], str(tmp_path / name), fn)
        out[name] = measures.amplification({"glue/sst2": {"r2": run}}, ["r2"])
    assert out["top"]["dirs_over_random:r2:v"] > 2 and _verdict("above", [out["top"]["dirs_over_random:r2:v"]] * 3, 1.0) == V.HOLDS
    assert out["bottom"]["dirs_over_random:r2:v"] < 1 and \
        _verdict("above", [out["bottom"]["dirs_over_random:r2:v"] + e for e in (0, 1e-3, 2e-3)], 1.0) == V.FAILS
    assert out["top"]["factor:r2:v"] == pytest.approx(3 * out["small"]["factor:r2:v"], rel=1e-3)
    assert out["top"]["dirs_over_random:r2:v"] == pytest.approx(out["small"]["dirs_over_random:r2:v"], rel=1e-6)
    gain = [out["top"]["dirs_over_random:r2:v"] - out["small"]["dirs_over_random:r2:v"] + e for e in (0, 1e-9, -1e-9)]
    assert _verdict("better", gain) != V.HOLDS


def _result(tmp_path, preds_on, preds_off, labels, val_gains=(0.0, 0.0, 0.0)):
    """A ClaimResult for one arm over seeds whose test predictions (with and without ΔW) and validation gains over
    the head-only runs are given by hand."""
    runs = {}
    for seed, (on, off, gain) in enumerate(zip(preds_on, preds_off, val_gains)):
        d = tmp_path / f"s{seed}"
        d.mkdir(parents=True)
        (d / "test_predictions.json").write_text(json.dumps({"dev": {"labels": labels, "predictions": on}}))
        (d / measures.WITHOUT_DELTA_FILE).write_text(json.dumps(
            {"score": sum(p == y for p, y in zip(off, labels)) / len(labels), "val_score": 0.5,
             "predictions": {"labels": labels, "predictions": off}}))
        runs[seed] = {"glue/sst2": {a: runner.SuiteRun("glue/sst2", a, seed, str(d), {}, 0.5, 0.5 + gain, [], 0.0)
                                    for a in ("a", "b")}}
    claim = Claim(id="C", title="t", tasks=["glue.0"], arms={"a": {}, "b": {}})
    result = ClaimResult(claim, ["glue/sst2"], list(runs), runs, {}, [], V.UNSURE,
                         gates={"glue/sst2": (True, "")})
    return result


def test_the_head_only_gate_reads_the_validation_split_and_says_when_it_cannot_decide(tmp_path):
    """The gate is the per-seed validation gain over the same runs with ΔW removed (the test split gates nothing):
    no gain -> "adapter not learned" and the part comparing the arm is not testable; a clear gain -> learned
    (whatever the test split says); a gain the seeds cannot resolve -> "gain unresolved", and the part is judged
    with that note (v3 failed the largest gains on their spread)."""
    labels = [i % 2 for i in range(200)]
    same = [[(i + s) % 2 if i % 5 else 1 - i % 2 for i in range(200)] for s in range(3)]
    better = [[y if i % 4 else 1 - y for i, y in enumerate(labels)] for _ in range(3)]  # 75 % right
    worse = [[y if i % 2 else 1 - y for i, y in enumerate(labels)] for _ in range(3)]  # 50 % right
    compare = {"rule": "at_least", "a": "score:a", "b": "score:b", "margin": 0.02}
    flat = _result(tmp_path / "flat", better, worse, labels)  # a test gain, but none on validation
    check = head_only_check(flat, "glue/sst2", "a")
    assert check["status"] == "adapter not learned" and not check["learned"] and check["interval"].mean == 0
    flat.head_only = {"glue/sst2": {"a": check}}
    part = evaluate_check(flat, compare)
    assert part["verdict"] == V.UNTESTABLE and "adapter not learned: a" in part["note"]
    good = _result(tmp_path / "good", same, same, labels, val_gains=(0.04, 0.05, 0.06))  # no test gain
    check = head_only_check(good, "glue/sst2", "a")
    assert check["status"] == "learned" and check["interval"].low > 0
    spread = _result(tmp_path / "spread", better, worse, labels, val_gains=(0.12, -0.01, 0.09))
    check = head_only_check(spread, "glue/sst2", "a")
    assert check["status"] == "gain unresolved" and check["learned"] and check["interval"].low < 0 < check["interval"].high
    spread.head_only = {"glue/sst2": {"a": check, "b": check}}
    part = evaluate_check(spread, compare)
    assert part["verdict"] != V.UNTESTABLE and "gain unresolved over head-only: a; gain unresolved over head-only: b" \
        in part["note"]
    assert "head-only test: a 0.500, b 0.500" in part["note"]  # both arms' heads alone, beside the comparison


def test_the_stopping_check_reads_only_seeds_whose_loss_turned():
    """regret < 1.1, read per seed where the loss turned and the curve has a clear minimum: a seed truncated at its
    cap (its minimum the last evaluation) drops out; all truncated: not interpretable; clear regrets above: fails."""
    claim = Claim(id="C7", title="t", tasks=["glue.0"], arms={"a": {}})
    check = {"part": "regret", "rule": "below", "a": "regret_at_prediction", "threshold": 1.1,
             "requires": [{"quantity": "turned", "above": 0.5}, {"quantity": "curve_range", "above": 1.2}]}

    def judge(regret, turned, ranges):
        result = ClaimResult(claim, ["glue/stsb"], [0, 1, 2], {}, {"regret_at_prediction": regret, "turned": turned,
                                                                   "curve_range": ranges}, [], V.UNSURE,
                             gates={"glue/stsb": (True, "")})
        return evaluate_check(result, check)

    kept = judge([1.02, 1.6, 1.03], [1, 0, 1], [1.5, 1.6, 1.4])  # seed 1 never turned: its 1.6 is truncation
    assert kept["interval"].n == 2 and kept["verdict"] == V.HOLDS and "turned > 0.5 in 2 of 3" in kept["note"]
    assert judge([1.02, 1.01, 1.03], [0, 0, 0], [1.5, 1.6, 1.4])["verdict"] == V.UNSURE  # nothing to read
    one = judge([1.44, 1.147, 1.3], [1, 0, 0], [1.5, 1.6, 1.4])  # v3's C7: one readable seed, past the bound
    assert one["verdict"] == V.UNSURE and "leans not held: the readable seed's value 1.44 is past" in one["note"]
    assert judge([1.3, 1.35, 1.4], [1, 1, 1], [1.5, 1.6, 1.7])["verdict"] == V.FAILS
