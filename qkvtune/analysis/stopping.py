"""Data-dependent early stopping for gradient descent in a kernel regime (Raskutti, Wainwright & Yu 2014),
applied at the pretrained initialisation with the eNTK, and a Trainer callback that stops there.

Gradient descent on (1/2n)Σ(f(x_i) − y_i)² with step sizes α_t, cumulative η_t = Σ_{τ<t} α_τ, starting from
f₀ (residual targets r = y − f₀). With λ̂_i the eigenvalues of K/n:

    R̂(ε) = sqrt((1/n) Σ_i min(λ̂_i, ε²)),        T̂ = min{t : R̂(1/√η_t) > R/(2eσ η_t)} − 1.

σ is the noise level and R the RKHS norm of the target (RWY assume R = 1; the rule scales with R, and an
R measured in the kernel's own norm makes T̂ invariant to rescaling K by c and the steps by 1/c, which
leaves training unchanged; R = 1 would not). When not given, σ and R come from one
kernel ridge fit of r with the ridge chosen by leave-one-out: σ̂² = ‖r − Hr‖²/(n − tr H) and R̂² = αᵀKα
(the regularised version of the rᵀK⁺r the authors' earlier code uses; K⁺ would fit the noise).

The rule fires once η_t reaches η̂ (``stopping_eta``), whatever the schedule: η̂ / lr is the step count for a
constant learning rate. Steps of the rule are optimizer steps when (assumptions, stated so they can be checked):
1. the loss is the square loss on f (for cross-entropy on a margin, the curvature differs by p(1−p));
2. a minibatch step with learning rate α_t is, in expectation, one full-batch step of size α_t;
3. the optimizer is plain SGD (Adam's per-coordinate scaling is not a kernel step; treat its learning
   rate as an effective one at your own risk);
4. training stays in the linearised regime around the pretrained weights.
Epochs are steps / ⌈n_train / (batch_size · grad_accum)⌉, as in ``transformers.Trainer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import AnalysisError
from .kernel_regression import loo_ridge
from .ntk import eigenvalues, few_threads


def complexity(eigs_normalized: torch.Tensor, eps_sq: torch.Tensor) -> torch.Tensor:
    """R̂(ε) for every ε² in ``eps_sq`` at once, from the eigenvalues λ̂ of K/n (sorting + prefix sums)."""
    lam = eigs_normalized.double().clamp_min(0).sort().values
    n = len(lam)
    prefix = torch.cat([torch.zeros(1, dtype=torch.float64), lam.cumsum(0)])
    c = torch.as_tensor(eps_sq, dtype=torch.float64)
    below = torch.searchsorted(lam, c)  # how many λ̂ are < ε²
    return ((prefix[below] + c * (n - below)) / n).sqrt()


def stopping_step(eigs: torch.Tensor, sigma: float, step_sizes, rkhs_norm: float = 1.0) -> dict:
    """T̂ for kernel eigenvalues ``eigs`` (of K, not K/n) and step sizes α_0, α_1, … (the horizon).

    Returns {"step": T̂, "crossed": whether the condition was met within the horizon (else T̂ = horizon),
    "eta", "complexity", "threshold"} — the curves over t = 1..horizon.
    """
    if sigma <= 0:
        raise AnalysisError(f"sigma: must be > 0, got {sigma}")
    eigs = torch.as_tensor(eigs, dtype=torch.float64)
    alpha = torch.as_tensor(step_sizes, dtype=torch.float64).reshape(-1)
    if len(alpha) == 0 or (alpha < 0).any():
        raise AnalysisError("step_sizes: need at least one step and no negative step size")
    eta = alpha.cumsum(0)  # eta[t-1] = η_t = Σ_{τ<t} α_τ
    ok = eta > 0
    r = torch.zeros_like(eta)
    r[ok] = complexity(eigs / len(eigs), 1.0 / eta[ok])
    threshold = torch.full_like(eta, math.inf)
    threshold[ok] = rkhs_norm / (2 * math.e * sigma * eta[ok])
    hit = torch.nonzero(r > threshold)
    crossed = len(hit) > 0
    step = int(hit[0, 0]) if crossed else len(eta)  # first t (1-based: index + 1), minus 1
    return {"step": step, "crossed": crossed, "eta": eta, "complexity": r, "threshold": threshold}


def stopping_eta(eigs: torch.Tensor, sigma: float, rkhs_norm: float = 1.0) -> float:
    """η̂: the cumulative step size at which the rule fires, whatever the schedule (T̂ is the last step with
    η_t < η̂). R̂(1/√η)·η = sqrt(mean(min(λ̂η², η))) grows with η, so the crossing is found by bisection."""
    lam = torch.as_tensor(eigs, dtype=torch.float64) / len(eigs)
    target = rkhs_norm / (2 * math.e * sigma)
    lo, hi = 1e-15, 1e15
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if float(complexity(lam, torch.tensor([1.0 / mid]))[0]) * mid > target:
            hi = mid
        else:
            lo = mid
    return hi


def critical_radius(eigs: torch.Tensor, sigma: float, rkhs_norm: float = 1.0) -> float:
    """ε̂_n² (in units of f²) solving R̂(ε) = ε²/(2eσ) for the target scaled to norm 1 (σ → σ/R), times R²:
    the error level RWY guarantee at T̂, ‖f_T̂ − f*‖²_n ≲ ε̂_n²."""
    lam = torch.as_tensor(eigs, dtype=torch.float64) / len(eigs)
    s = sigma / rkhs_norm
    lo, hi = 1e-12, 1e12
    for _ in range(200):  # bisection in log space: R̂(ε) − ε²/(2es) goes from + to −
        mid = math.sqrt(lo * hi)
        if float(complexity(lam, torch.tensor([mid * mid]))[0]) > mid * mid / (2 * math.e * s):
            lo = mid
        else:
            hi = mid
    return rkhs_norm ** 2 * lo * lo


def step_sizes(lr: float, total_steps: int, warmup_ratio: float = 0.0, scheduler: str = "constant") -> torch.Tensor:
    """The learning rate of each optimizer step, exactly as ``transformers.get_scheduler`` sets it
    (a warmup ratio < 1 is ⌈ratio·total⌉ steps, as ``TrainingArguments`` does)."""
    from transformers import get_scheduler

    if total_steps < 1 or lr <= 0:
        raise AnalysisError(f"lr/total_steps: need lr > 0 and total_steps >= 1, got {lr}, {total_steps}")
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    warmup = math.ceil(total_steps * warmup_ratio) if warmup_ratio < 1 else int(warmup_ratio)
    sched = get_scheduler(scheduler, opt, num_warmup_steps=warmup, num_training_steps=total_steps)
    out = []
    for _ in range(total_steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return torch.tensor(out, dtype=torch.float64)


def steps_per_epoch(n_train: int, batch_size: int, grad_accum: int = 1) -> int:
    return max(1, math.ceil(n_train / batch_size) // grad_accum)


@dataclass
class StoppingPrediction:
    step: int                      # optimizer steps to run (T̂)
    crossed: bool                  # False: the rule did not fire within the horizon
    sigma: float
    rkhs_norm: float
    sigma_estimated: bool
    critical_radius_sq: float
    epoch: float | None = None
    steps_per_epoch: int | None = None
    curves: dict = field(default_factory=dict)  # eta, complexity, threshold per step
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {"predicted_step": self.step, "predicted_epoch": self.epoch, "crossed": self.crossed,
                "sigma": self.sigma, "sigma_estimated": self.sigma_estimated, "rkhs_norm": self.rkhs_norm,
                "critical_radius_sq": self.critical_radius_sq, "steps_per_epoch": self.steps_per_epoch,
                "horizon": len(self.curves.get("eta", [])), **self.extra}

    def save(self, out_dir: str, name: str = "stopping", test_error: dict | None = None) -> dict:
        """``name``.json and ``name``.png: R̂(1/√η_t) and the threshold against the step, T̂ marked."""
        import os

        from .plots import plot_lines
        from ..files import write_json

        os.makedirs(out_dir, exist_ok=True)
        summary = self.summary()
        write_json(os.path.join(out_dir, f"{name}.json"), summary)
        t = list(range(1, len(self.curves["eta"]) + 1))
        series = {"R̂(1/√η_t)": (t, self.curves["complexity"].tolist()),
                  "R/(2eση_t)": (t, self.curves["threshold"].tolist())}
        series.update(test_error or {})
        plot_lines(series, os.path.join(out_dir, f"{name}.png"), title="RWY stopping rule", xlabel="step",
                   log="xy", vlines={f"T̂ = {self.step}": max(self.step, 1)})
        return summary


def predict_stopping(kernel: torch.Tensor, *, residuals: torch.Tensor | None = None, sigma: float | None = None,
                     rkhs_norm: float | None = None, lr: float | None = None, total_steps: int | None = None,
                     steps=None, warmup_ratio: float = 0.0, scheduler: str = "constant", n_train: int | None = None,
                     batch_size: int | None = None, grad_accum: int = 1) -> StoppingPrediction:
    """The predicted stopping step for kernel ``kernel`` (n×n, the training examples).

    Step sizes: ``steps`` (a sequence α_t), or ``lr`` with ``total_steps`` and a warmup/scheduler as in
    ``transformers``. ``residuals`` r = y − f₀ are needed unless both ``sigma`` and ``rkhs_norm`` are given.
    With ``batch_size`` (and ``n_train``, default n) the step is also given in epochs.
    """
    kernel = kernel.double()
    n = len(kernel)
    extra = {}
    if sigma is None or rkhs_norm is None:
        if residuals is None:
            raise AnalysisError("residuals: needed to estimate sigma / rkhs_norm (or pass both)")
        fit = loo_ridge(kernel, residuals)
        lam = fit["ridge"] * float(kernel.diagonal().mean())
        r = residuals.double().reshape(n, -1)
        with few_threads(n):
            alpha = torch.linalg.solve(kernel + lam * torch.eye(n, dtype=torch.float64), r)
        norm = math.sqrt(max(float((alpha * (kernel @ alpha)).sum()), 0.0))
        extra["krr"] = {"ridge": fit["ridge"], "loo_mse": fit["loo_mse"], "dof": fit["dof"]}
        estimated = sigma is None
        sigma = fit["sigma"] if sigma is None else sigma
        rkhs_norm = norm if rkhs_norm is None else rkhs_norm
        if sigma <= 0:
            raise AnalysisError("sigma: the kernel fits the residuals exactly (σ̂ = 0); pass sigma")
    else:
        estimated = False
    if steps is None:
        if lr is None or total_steps is None:
            raise AnalysisError("lr/total_steps: give the step sizes (steps=...) or lr and total_steps")
        steps = step_sizes(lr, total_steps, warmup_ratio, scheduler)
    eigs = eigenvalues(kernel)
    rule = stopping_step(eigs, sigma, steps, rkhs_norm)
    spe = steps_per_epoch(n_train or n, batch_size, grad_accum) if batch_size else None
    extra["eta_hat"] = stopping_eta(eigs, sigma, rkhs_norm)
    return StoppingPrediction(
        step=rule["step"], crossed=rule["crossed"], sigma=sigma, rkhs_norm=rkhs_norm, sigma_estimated=estimated,
        critical_radius_sq=critical_radius(eigs, sigma, rkhs_norm), epoch=rule["step"] / spe if spe else None,
        steps_per_epoch=spe, curves={k: rule[k] for k in ("eta", "complexity", "threshold")}, extra=extra)
