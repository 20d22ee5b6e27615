"""``lr: auto`` (autolr.py): the direction is the optimizer's own first step (Adam's closed form), the line search
finds a quadratic's minimiser, the rate moves exactly as LoRA's scale says it must, and a run at ``lr: auto`` is
the run at the rate it recorded (the probe leaves nothing behind)."""

import json
import math

import pytest
import torch
import yaml

from conftest import data_dir, lora_weights, run_cli
from qkvtune import autolr, runs
from qkvtune.config import build_config
from qkvtune.train import train

needs_data = pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")


def _settings(tmp_path, model, **kw):
    return {**dict(model=model, task="glue/sst2", data_dir=data_dir(), max_train_samples=64, max_eval_samples=32,
                   batch_size=8, max_steps=6, logging_steps=2, output_dir=str(tmp_path / "run"), lr="auto",
                   method="lora", rank=4, alpha=8, targets=["q", "v"]), **kw}


class Quadratic:
    """A stand-in trainer whose loss is ½·Σ h·(θ − θ*)² over one parameter: its line search has a closed form."""

    def __init__(self, h, target):
        self.h, self.target = h, target

    def compute_loss(self, model, batch):
        return 0.5 * (self.h * (model.w - self.target) ** 2).sum()


def test_line_search_finds_the_quadratic_minimiser_along_the_step():
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(3))
    h, target = torch.tensor([2.0, 50.0, 400.0]), torch.tensor([1.0, -0.5, 0.25])
    d = [torch.tensor([1.0, -1.0, 1.0])]  # a sign step, as Adam's first
    # along θ + η·d the loss is ½Σh(ηd − θ*)²: minimum at η = Σ h d θ* / Σ h d²
    exact = float((h * d[0] * target).sum() / (h * d[0] ** 2).sum())
    found = autolr.line_search(Quadratic(h, target), model, [model.w], d, [{}])
    assert abs(math.log10(found["eta"] / exact)) <= 0.125 + 1e-9  # the ladder's quarter decade, halved
    assert torch.equal(model.w.detach(), torch.zeros(3))  # the weights are put back
    # a step that only raises the loss has no η*
    assert autolr.line_search(Quadratic(h, target), model, [model.w], [-d[0]], [{}])["eta"] is None


@needs_data
def test_direction_is_adams_first_step_with_each_groups_ratio(tmp_path, tiny_bert_dir):
    cfg = build_config(_settings(tmp_path, tiny_bert_dir, lr_ratio=4.0, lr_head=0.01))
    run = runs.build(cfg)
    from qkvtune.optim import param_groups

    groups = param_groups(run.model, build_config({**_settings(tmp_path, tiny_bert_dir), "lr": 1.0,
                                                   "lr_ratio": 4.0, "lr_head": 0.01}))
    opt = torch.optim.AdamW(groups, eps=1e-8, weight_decay=0.0)
    batch = run.task.collator([run.task.train[i] for i in range(8)])
    run.model(**batch).loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    grads = [p.grad.clone() for p in params]
    before = [p.detach().clone() for p in params]
    scale = autolr.scaling_groups(run.model, cfg)
    d = autolr._direction(opt, params, [s if moves else 0.0 for s, moves in scale])
    # Adam's first step (bias-corrected): −lr·g/(|g| + ε); V at λ = 4, the head at its own rate (not moved by η_Q)
    i = 0
    for g, (s, moves) in zip(opt.param_groups, scale):
        kind = g["name"].split(".")[0]
        if kind == "head":
            assert not moves and s == pytest.approx(0.01)
            want_lr = 0.0
        else:
            assert moves
            want_lr = 4.0 if kind == "v" else 1.0
        for _ in g["params"]:
            want = -want_lr * grads[i] / (grads[i].abs() + 1e-8)
            assert torch.allclose(d[i], want, atol=1e-6), g["name"]
            assert torch.equal(params[i].detach(), before[i])  # the step was undone
            i += 1
    assert opt.state_dict()["state"] == {} or all(v.get("step", 0) == 0 for v in opt.state_dict()["state"].values())


@needs_data
def test_rate_follows_lora_scale_exactly(tmp_path, tiny_bert_dir):
    """With the head fixed, the first step's ΔW is (α/r)·η·sign(∂L/∂B)·A: at ten times α the search's loss at η is
    its loss at 10·η with α — the whole curve moves a decade, so the rate does."""
    curves = []
    for alpha in (8, 80):
        cfg = build_config(_settings(tmp_path, tiny_bert_dir, alpha=alpha, lr_head=0.0))
        _, record = autolr.choose_rate(cfg, runs.build(cfg), log=lambda m: None)
        curves.append(record["curve"])
    pairs = [(v80, v8) for e80, v80 in curves[1] for e8, v8 in curves[0] if math.isclose(10 * e80, e8, rel_tol=1e-3)]
    assert len(pairs) >= 5
    for v80, v8 in pairs:
        assert v80 == pytest.approx(v8, rel=1e-3)  # (unshifted, they differ by 2 % here)
    lows = [min(c, key=lambda p: p[1]) for c in curves]
    assert lows[0][1] < curves[0][0][1]  # the loss along the step falls before it rises


@needs_data
def test_auto_run_is_the_run_at_its_recorded_rate(tmp_path, tiny_bert_dir):
    metrics = train(build_config(_settings(tmp_path, tiny_bert_dir)))
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    lr, why = saved["lr"], saved["lr_auto"]
    assert isinstance(lr, float) and lr == why["lr"] and why["margin"] == pytest.approx(0.1)
    tried = why["short_runs"]["tried"]  # (1 − β₁)·η* × 1, √10, 10, climbed while the held-out loss falls
    assert tried[0][0] == pytest.approx(why["margin"] * why["eta_star"], rel=2e-3)
    assert [r for r, _ in tried] == sorted(r for r, _ in tried) and all(r <= why["eta_star"] * 1.001 for r, _ in tried)
    assert lr == min(tried, key=lambda t: math.inf if t[1] is None else t[1])[0]
    curve = why["curve"]
    assert min(v for _, v in curve if v is not None) < why["loss"]  # it found a descent
    rates = json.load(open(tmp_path / "run" / "qkvtune_adapter.json"))["settings"]["learning_rates"]
    assert rates["q.B"] == lr
    fixed = train(build_config({**_settings(tmp_path, tiny_bert_dir), "lr": lr, "output_dir": str(tmp_path / "b")}))
    assert fixed["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    a, b = (lora_weights(runs.open_run(str(tmp_path / d)).model) for d in ("run", "b"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_climb_reads_rates_upwards_while_the_loss_falls():
    """The short runs' search: up the rates while each beats every lower one; the first that does not is the last
    read (a fifth of a run each: the ones above it cost nothing); a non-finite loss stops it and never wins."""
    calls = []

    def valley(best):
        def loss_at(rate):
            calls.append(rate)
            return (math.log10(rate) - math.log10(best)) ** 2
        return loss_at

    rates = [1e-3, 3.16e-3, 1e-2]
    assert autolr.climb(rates, valley(3e-3))[0] == 3.16e-3 and calls == rates
    calls.clear()
    assert autolr.climb(rates, valley(1e-4))[0] == 1e-3 and calls == rates[:2]
    calls.clear()
    assert autolr.climb(rates, valley(1.0))[0] == 1e-2 and calls == rates
    chosen, tried = autolr.climb(rates, lambda r: math.inf if r > 2e-3 else 0.5)
    assert chosen == 1e-3 and [r for r, _ in tried] == rates[:2]
    assert autolr.climb(rates, lambda r: math.nan)[0] == 1e-3


def test_bad_lr_is_one_line_and_exit_2(tmp_path):
    r = run_cli("train", "lr=fast", f"output_dir={tmp_path / 'x'}")
    assert r.returncode == 2 and "lr:" in r.stderr and "auto" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
