"""Early stopping (RWY 2014): on a linear model, where kernel gradient descent is exact and its test error has a
closed form, the rule stops where that error is (near) minimal; the noise estimate is right; step sizes follow
transformers' schedulers; the Trainer callback stops at the predicted step and records the observed best."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments

from conftest import data_dir
from qkvtune.analysis import AnalysisError
from qkvtune.targets import find_targets
from qkvtune.callbacks import NTKEarlyStoppingCallback, ntk_stopping_callback
from qkvtune.analysis.stopping import (complexity, critical_radius,
                                       predict_stopping, step_sizes, stopping_eta, stopping_step)


def _linear_problem(seed, n=300, p=600, decay=1.0, signal=0.75, sigma=0.3):
    """f(x) = θᵀφ(x) with feature scales i^-decay and θ* scales i^-signal: the NTK is exactly ΦΦᵀ."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, p + 1, dtype=torch.float64) ** -decay
    phi = torch.randn(n, p, generator=g, dtype=torch.float64) * scale
    theta = torch.randn(p, generator=g, dtype=torch.float64) * torch.arange(1, p + 1, dtype=torch.float64) ** -signal
    y = phi @ theta + sigma * torch.randn(n, generator=g, dtype=torch.float64)
    return phi, theta, y, scale


def _test_error_curve(phi, theta, y, scale, step, horizon):
    """Population error E(f_t − f*)² of GD from θ = 0 on (1/2n)‖Φθ − y‖², for t = 0..horizon, in closed form."""
    n = len(y)
    lam, u = torch.linalg.eigh(phi @ phi.T / n)
    lam = lam.clamp_min(0)
    t = torch.arange(horizon + 1, dtype=torch.float64)
    shrink = 1 - (1 - step * lam)[None, :] ** t[:, None]
    inv = torch.where(lam > 1e-12, 1 / (n * lam.clamp_min(1e-300)), torch.zeros_like(lam))
    theta_t = (shrink * inv * (u.T @ y)) @ (phi.T @ u).T
    return (((theta_t - theta) * scale) ** 2).sum(1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_stops_where_linear_kernel_gd_test_error_is_minimal(seed):
    phi, theta, y, scale = _linear_problem(seed)
    k = phi @ phi.T
    step = 0.2 / float(torch.linalg.eigvalsh(k / len(y)).max())
    horizon = 2000
    err = _test_error_curve(phi, theta, y, scale, step, horizon)
    best = int(err.argmin())
    steps = torch.full((horizon,), step)
    for pred in (predict_stopping(k, residuals=y, steps=steps),  # σ and R estimated from the data
                 predict_stopping(k, sigma=0.3, rkhs_norm=float(theta.norm()), steps=steps)):  # known
        t_hat = pred.step
        assert pred.crossed
        # RWY is rate-optimal with a conservative constant (2e): it lands in the minimum's basin, a bit early
        assert best / 5 <= t_hat <= 1.5 * best, (t_hat, best)
        assert err[t_hat] <= 2.0 * err[best], (float(err[t_hat]), float(err[best]))
        assert err[t_hat] < err[0] / 10 and err[t_hat] < err[-1]
    assert pred.critical_radius_sq > 0
    assert predict_stopping(k, residuals=y, steps=steps).sigma == pytest.approx(0.3, rel=0.1)


def test_rule_matches_the_formula_by_hand():
    eigs = torch.tensor([40.0, 10.0, 4.0, 1.0, 0.5, 0.1], dtype=torch.float64)  # of K; n = 6
    sigma, alpha = 0.5, torch.full((50,), 0.3, dtype=torch.float64)
    lam = eigs / 6
    t_hat = None
    for t in range(1, 51):
        eta = 0.3 * t
        r = math.sqrt(sum(min(float(v), 1 / eta) for v in lam) / 6)
        if r > 1 / (2 * math.e * sigma * eta):
            t_hat = t - 1
            break
    out = stopping_step(eigs, sigma, alpha)
    assert out["crossed"] and out["step"] == t_hat
    eta_hat = stopping_eta(eigs, sigma)
    assert 0.3 * t_hat < eta_hat <= 0.3 * (t_hat + 1)  # T̂ = the last step whose η_t is below η̂
    assert complexity(lam, torch.tensor([1e9]))[0] ** 2 == pytest.approx(float(lam.mean()))
    eps2 = critical_radius(eigs, sigma)
    assert float(complexity(lam, torch.tensor([eps2]))[0]) == pytest.approx(eps2 / (2 * math.e * sigma), rel=1e-6)
    never = stopping_step(eigs, 1e-6, torch.full((5,), 1e-3))
    assert not never["crossed"] and never["step"] == 5
    with pytest.raises(AnalysisError, match="sigma"):
        stopping_step(eigs, 0.0, alpha)


def test_step_sizes_follow_transformers_schedules():
    s = step_sizes(1e-3, 100, warmup_ratio=0.1, scheduler="linear")
    assert s[0] == 0 and s[5] == pytest.approx(5e-4) and s[10] == pytest.approx(1e-3)
    assert s[55] == pytest.approx(1e-3 * 45 / 90)
    assert torch.all(step_sizes(0.1, 7) == 0.1)
    pred = predict_stopping(torch.eye(4) * 2 + 1, sigma=0.1, rkhs_norm=1.0, lr=0.5, total_steps=40, n_train=64,
                            batch_size=16)
    assert pred.steps_per_epoch == 4 and pred.epoch == pred.step / 4


def _toy_trainer(tmp_path, callback, steps=12):
    torch.manual_seed(0)
    from conftest import tiny

    model = tiny("bert", 2)
    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(2, 64, (6,), generator=g), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                             learning_rate=1e-3, eval_strategy="steps", eval_steps=2, save_strategy="no",
                             metric_for_best_model="loss", greater_is_better=False, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=100)
    return Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:8], callbacks=[callback])


def test_callback_stops_at_the_predicted_step_and_records_best(tmp_path):
    cb = NTKEarlyStoppingCallback(5, record_path=str(tmp_path / "ntk_stop.json"))
    trainer = _toy_trainer(tmp_path, cb)
    trainer.train()
    assert trainer.state.global_step == 5
    assert cb.record["ntk_predicted_step"] == 5 and cb.record["ntk_stopped_at"] == 5
    assert cb.record["ntk_observed_best_step"] in (2, 4, 5)  # the stop step is evaluated too
    assert (tmp_path / "ntk_stop.json").exists()
    assert any("ntk_predicted_step" in h for h in trainer.state.log_history)
    watch = NTKEarlyStoppingCallback(3, stop=False)  # record only
    trainer = _toy_trainer(tmp_path / "b", watch, steps=8)
    trainer.train()
    assert trainer.state.global_step == 8 and watch.record["ntk_observed_best_step"] in (2, 4, 6, 8)


@pytest.mark.skipif(data_dir() is None, reason="shared datasets not found")
def test_ntk_stopping_callback_from_a_model_and_its_data(tiny_bert_dir):
    from transformers import AutoTokenizer

    from qkvtune.data import load_task

    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    task = load_task("glue/sst2", tok, data_dir=data_dir(), max_train_samples=48, max_eval_samples=8)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
    cb = ntk_stopping_callback(model, task.train, task.collator, find_targets(model, ("q", "v")), lr=5e-3,
                               batch_size=8, epochs=3, warmup_ratio=0.06, n=32)
    pred = cb.prediction
    assert 0 <= cb.predicted_step <= 18 and pred.steps_per_epoch == 6
    assert pred.sigma > 0 and pred.rkhs_norm > 0 and pred.epoch == cb.predicted_step / 6
