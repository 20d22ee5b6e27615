"""Kernel predictors on the eNTK: what training θ in the linearised regime would reach, at the cost of a solve.

Linearised fine-tuning moves f from f₀ along the kernel: f(x) = f₀(x) + Σ_j k(x, x_j) α_j. Kernel ridge
regression fits α in closed form to the residual targets y − f₀ (``residual=True``); kernel logistic
regression fits α by L-BFGS to the cross-entropy of f₀ + Kα. Ridge strengths are relative to the mean
kernel diagonal (tr K / n), so they do not depend on the kernel's scale.
"""

from __future__ import annotations

import math

import torch

from . import AnalysisError
from .ntk import few_threads


def _ridge_abs(k: torch.Tensor, ridge: float) -> float:
    return ridge * float(k.diagonal(dim1=-2, dim2=-1).mean())


def _as_2d(y: torch.Tensor) -> torch.Tensor:
    return y[:, None] if y.dim() == 1 else y


def kernel_ridge(k_train: torch.Tensor, y: torch.Tensor, k_test: torch.Tensor | None = None, *, ridge: float = 1e-3,
                 f0_train: torch.Tensor | None = None, f0_test: torch.Tensor | None = None) -> torch.Tensor:
    """Predictions f₀ + K_* (K + ridge·(tr K/n)·I)⁻¹ (y − f₀) on the test points (train points if ``k_test`` is None).

    Kernels are (n, n) / (m, n) shared by every output column of y, or (C, n, n) / (C, m, n): one kernel
    per output (vector f). ``f0_*`` default to zero (plain kernel regression).
    """
    y = _as_2d(y).double()
    k_train = k_train.double()
    k_test = k_train if k_test is None else k_test.double()
    f0_train = torch.zeros_like(y) if f0_train is None else _as_2d(f0_train).double()
    if f0_test is None:
        f0_test = torch.zeros(k_test.shape[-2], y.shape[1], dtype=torch.float64)
    f0_test = _as_2d(f0_test).double()
    r = y - f0_train
    eye = torch.eye(len(r), dtype=torch.float64)
    if k_train.dim() == 2:
        with few_threads(len(r)):
            alpha = torch.linalg.solve(k_train + _ridge_abs(k_train, ridge) * eye, r)
        return f0_test + k_test @ alpha
    if k_train.shape[0] != y.shape[1]:
        raise AnalysisError(f"kernel: {k_train.shape[0]} per-output kernels for {y.shape[1]} target columns")
    cols = []
    for c in range(y.shape[1]):
        kc = k_train[c]
        with few_threads(len(r)):
            alpha = torch.linalg.solve(kc + _ridge_abs(kc, ridge) * eye, r[:, c])
        cols.append(k_test[c] @ alpha)
    return f0_test + torch.stack(cols, 1)


def loo_ridge(k: torch.Tensor, r: torch.Tensor, ridges=None) -> dict:
    """Leave-one-out choice of the ridge for kernel ridge regression of residuals ``r`` (closed form via the
    hat matrix H = K(K + λI)⁻¹: LOO residual = (r − Hr)_i / (1 − H_ii)), and the noise estimate
    σ̂² = ‖r − Hr‖² / (n − tr H) at the chosen ridge (Wahba's estimator for linear smoothers)."""
    ridges = list(ridges) if ridges is not None else [10.0 ** e for e in range(-6, 3)]
    k = k.double()
    r = _as_2d(r).double()
    n = len(r)
    scale = float(k.diagonal().mean())
    with few_threads(n):
        e, u = torch.linalg.eigh((k + k.T) / 2)
    e = e.clamp_min(0)
    ur = u.T @ r
    best = None
    errors = []
    for lam in ridges:
        shrink = e / (e + lam * scale)
        fit = u @ (shrink[:, None] * ur)
        h_diag = (u ** 2 * shrink).sum(1)
        loo = (r - fit) / (1 - h_diag).clamp_min(1e-12)[:, None]
        err = float((loo ** 2).mean())
        errors.append(err)
        if best is None or err < best[0]:
            dof = float(shrink.sum())
            sigma2 = float(((r - fit) ** 2).sum() / (r.shape[1] * max(n - dof, 1e-12)))
            best = (err, lam, sigma2, dof)
    err, lam, sigma2, dof = best
    return {"ridge": lam, "loo_mse": err, "sigma": math.sqrt(max(sigma2, 0.0)), "dof": dof,
            "ridges": ridges, "loo_errors": errors}


def kernel_logistic(k_train: torch.Tensor, labels: torch.Tensor, k_test: torch.Tensor | None = None, *,
                    ridge: float = 1e-3, f0_train: torch.Tensor | None = None, f0_test: torch.Tensor | None = None,
                    max_iter: int = 200) -> torch.Tensor:
    """Logits f₀ + K_* α with α minimising mean cross-entropy + (λ/2)·Σ_c α_cᵀKα_c (λ = ridge·tr K/n).

    One output column (a margin) is binary logistic regression with labels in {0, 1}; C columns are
    softmax regression over C classes. Kernels are shared (n, n) or per output (C, n, n) as in ``kernel_ridge``.
    """
    labels = labels.long()
    n = len(labels)
    k_train = k_train.double()
    k_test = k_train if k_test is None else k_test.double()
    if f0_train is not None:
        cols = _as_2d(f0_train).shape[1]
    elif k_train.dim() == 3:
        cols = k_train.shape[0]
    else:
        cols = 1 if int(labels.max()) <= 1 else int(labels.max()) + 1
    f0_train = torch.zeros(n, cols, dtype=torch.float64) if f0_train is None else _as_2d(f0_train).double()
    f0_test = torch.zeros(k_test.shape[-2], cols, dtype=torch.float64) if f0_test is None else _as_2d(f0_test).double()
    lam = _ridge_abs(k_train, ridge)
    alpha = torch.zeros(n, cols, dtype=torch.float64, requires_grad=True)

    def apply(k, a):
        return k @ a if k.dim() == 2 else torch.einsum("cmn,nc->mc", k, a)

    def loss_fn():
        z = f0_train + apply(k_train, alpha)
        if cols == 1:
            data = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], labels.double())
        else:
            data = torch.nn.functional.cross_entropy(z, labels)
        return data + 0.5 * lam * (alpha * apply(k_train, alpha)).sum()

    opt = torch.optim.LBFGS([alpha], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with few_threads(n):  # many small n×n products: threads only add synchronisation
        opt.step(closure)
    return (f0_test + apply(k_test, alpha.detach())).detach()


def classify(scores: torch.Tensor) -> torch.Tensor:
    """Class ids from a margin column (> 0 → 1) or from C columns (argmax)."""
    scores = _as_2d(scores)
    return (scores[:, 0] > 0).long() if scores.shape[1] == 1 else scores.argmax(1)


def kernel_predictions(result, n_train: int, *, method: str = "ridge", ridge: float | None = None,
                       residual: bool = True, target_scale: float = 1.0) -> dict:
    """Fit a kernel predictor on the first ``n_train`` examples of an ``NTKResult`` and score the rest.

    Classification targets for ridge regression are ±``target_scale`` (a margin) or ``target_scale``·one-hot
    (C logits); regression labels are used as they are. ``residual`` fits y − f₀ (the linearised model
    starts at the pretrained outputs), else y from zero. ``ridge`` None: chosen by leave-one-out.
    Returns metrics and the test predictions.
    """
    if result.labels is None:
        raise AnalysisError("labels: the kernel was computed without per-example labels")
    n = len(result.labels)
    if not 0 < n_train < n:
        raise AnalysisError(f"n_train: must be in 1..{n - 1} (the rest are scored), got {n_train}")
    k = result.kernel if result.per_output is None else result.per_output
    tr, te = slice(0, n_train), slice(n_train, n)
    k_tr, k_te = k[..., tr, tr], k[..., te, tr]
    f0 = result.f0 if residual else torch.zeros_like(result.f0)
    y = result.labels
    regression = y.is_floating_point()
    targets = result.label_targets(target_scale)
    chosen = None
    if ridge is None:
        k_sel = k_tr if k_tr.dim() == 2 else k_tr.sum(0)
        chosen = loo_ridge(k_sel, targets[tr] - f0[tr])
        ridge = chosen["ridge"]
    if method == "ridge":
        pred = kernel_ridge(k_tr, targets[tr], k_te, ridge=ridge, f0_train=f0[tr], f0_test=f0[te])
    elif method == "logistic":
        if regression:
            raise AnalysisError("method: 'logistic' needs class labels; use 'ridge' for regression")
        pred = kernel_logistic(k_tr, y[tr], k_te, ridge=ridge, f0_train=f0[tr], f0_test=f0[te])
    else:
        raise AnalysisError(f"method: {method!r} is not ridge or logistic")
    out = {"method": method, "ridge": ridge, "residual": residual, "n_train": n_train, "n_test": n - n_train}
    if regression:
        p, t = pred[:, 0], targets[te, 0]
        out["mse"] = float(((p - t) ** 2).mean())
        out["pearson"] = float(torch.corrcoef(torch.stack([p, t]))[0, 1]) if p.std() > 0 else 0.0
    else:
        out["accuracy"] = float((classify(pred) == y[te].long()).double().mean())
        out["accuracy_f0"] = float((classify(result.f0[te]) == y[te].long()).double().mean())
    if chosen:
        out["loo"] = {k: v for k, v in chosen.items() if k != "ridges"}
    out["predictions"] = pred
    return out
