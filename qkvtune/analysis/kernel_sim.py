"""Kernel-simulated fine-tuning: the linearised model trained with per-kind learning rates, in closed form.

Around the pretrained weights f(x) ≈ f₀(x) + ⟨∇f₀(x), θ − θ₀⟩. Gradient descent on L = (1/2n) Σ_i (f(x_i) − y_i)²
with a rate η_k for each matrix kind k (q, k, v, o; the run's ``lr``, and ``lr_ratio``·lr for v) moves the
training outputs by (1/n)·K_η·r, r = y − f, with the rate-weighted kernel K_η = Σ_k η_k K_k (kinds not tuned
drop out). With K_η = U diag(μ) Uᵀ and r₀ = y − f₀ on the n training points, after t steps

    training residual      r_t = U diag(d_t(μ)) Uᵀ r₀
    validation outputs     f_t(X′) = f₀(X′) + K_η(X′, X) U diag((1 − d_t(μ))/μ) Uᵀ r₀

with d_t(μ) = (1 − μ/n)^t for full-batch gradient descent at a constant step (``flow=False``, exact for the
linearised model, and what mini-batch SGD does in expectation) or e^{−μt/n} for gradient flow (``flow=True``,
t = Σ step sizes / the rate already inside K_η). (1 − d_t)/μ → t/n as μ → 0. One eigendecomposition per
candidate set of rates, then every t costs two matrix products. ``../shared/reference/formulas.md``,
"Kernel-simulated fine-tuning"; Malladi et al. 2023 (arXiv 2210.05643) for the kernel view of fine-tuning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import AnalysisError


def rate_kernel(per_kind: dict[str, torch.Tensor], rates: dict[str, float]) -> torch.Tensor:
    """K_η = Σ_k η_k K_k over the kinds that have a rate (a kind without one, or with rate 0, is not tuned)."""
    kinds = [k for k, eta in rates.items() if eta]
    missing = [k for k in kinds if k not in per_kind]
    if missing:
        raise AnalysisError(f"rates: no kernel for kind {missing[0]!r} (have {sorted(per_kind)})")
    if not kinds:
        raise AnalysisError("rates: no kind has a nonzero rate")
    return sum(float(rates[k]) * per_kind[k].double() for k in kinds)


@dataclass
class Simulation:
    times: torch.Tensor          # (T,) steps
    val_outputs: torch.Tensor    # (T, m, C) f_t on the validation points
    train_residuals: torch.Tensor  # (T, n, C) y − f_t on the training points
    eigenvalues: torch.Tensor    # μ of K_η, largest first

    @property
    def train_loss(self) -> torch.Tensor:
        """(1/2n) Σ_i ‖r_t(x_i)‖² at each time."""
        return 0.5 * self.train_residuals.pow(2).sum((1, 2)) / self.train_residuals.shape[1]


@dataclass
class Eigenbasis:
    """K_η on the training points decomposed once, K_η = U diag(μ) Uᵀ, with r₀ = y − f₀ in that basis: every
    time t after is two matrix products (``at``), and the training movement ‖f_t − f₀‖ a vector norm."""

    n: int
    mu: torch.Tensor      # (n,) eigenvalues ≥ 0, ascending (``torch.linalg.eigh``'s order)
    u: torch.Tensor       # (n, n) eigenvectors
    a: torch.Tensor       # (n, C) Uᵀ r₀
    cross: torch.Tensor   # (m, n) K_η(X′, X) U
    f0_val: torch.Tensor  # (m, C) f₀ on the validation points

    def decay(self, times, flow: bool) -> torch.Tensor:
        """d_t(μ), (T, n)."""
        t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        if flow:
            return torch.exp(-self.mu[None, :] * t[:, None] / self.n)
        return (1.0 - self.mu[None, :] / self.n) ** t[:, None]

    @property
    def null(self) -> torch.Tensor:
        """(n,) the modes the kernel does not move (μ ≈ 0 relative to the largest)."""
        return self.mu < 1e-12 * max(float(self.mu.max()), 1e-300)

    def train_movement(self, times, flow: bool = True) -> torch.Tensor:
        """‖f_t − f₀‖ over the training outputs at each time: ‖diag(1 − d_t)·Uᵀr₀‖ (U is orthogonal), (T,)."""
        return ((1.0 - self.decay(times, flow))[:, :, None] * self.a[None]).flatten(1).norm(dim=1)

    @property
    def reach(self) -> float:
        """lim_{t→∞} ‖f_t − f₀‖ on the training points: r₀'s part in the kernel's range."""
        return float((~self.null[:, None] * self.a).norm())

    @property
    def initial_speed(self) -> float:
        """d‖f_t − f₀‖/dt at t = 0 under gradient flow: ‖K r₀‖/n."""
        return float((self.mu[:, None] * self.a).norm()) / self.n

    def at(self, times, flow: bool = False) -> "Simulation":
        t = torch.as_tensor(times, dtype=torch.float64).reshape(-1)
        decay = self.decay(t, flow)                                   # (T, n)
        mu, small = self.mu, self.null
        gain = torch.where(small[None, :], t[:, None] / self.n, (1.0 - decay) / torch.where(small, 1.0, mu)[None, :])
        residuals = torch.einsum("ij,tj,jc->tic", self.u, decay, self.a)
        val = self.f0_val[None] + torch.einsum("mj,tj,jc->tmc", self.cross, gain, self.a)
        return Simulation(t, val, residuals, mu.flip(0))


def decompose(kernel: torch.Tensor, n_train: int, f0: torch.Tensor, y: torch.Tensor) -> Eigenbasis:
    """``kernel`` is K_η on the n_train training points followed by the m validation points ((n+m)², or n² for
    no validation points), ``f0`` the outputs there ((n+m, C) or (n+m,)), ``y`` the training targets ((n, C)
    or (n,))."""
    kernel = kernel.double()
    n = int(n_train)
    if kernel.dim() != 2 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] < n or n < 1:
        raise AnalysisError(f"kernel: expected a square matrix over ≥ {n} points, got {tuple(kernel.shape)}")
    f0 = f0.double().reshape(kernel.shape[0], -1)
    y = y.double().reshape(n, -1)
    if y.shape[1] != f0.shape[1]:
        raise AnalysisError(f"y: {y.shape[1]} outputs per example, f0 has {f0.shape[1]}")
    mu, u = torch.linalg.eigh((kernel[:n, :n] + kernel[:n, :n].T) / 2)
    return Eigenbasis(n, mu.clamp(min=0.0), u, u.T @ (y - f0[:n]), kernel[n:, :n] @ u, f0[n:])


def simulate(kernel: torch.Tensor, n_train: int, f0: torch.Tensor, y: torch.Tensor, times, *,
             flow: bool = False) -> Simulation:
    """Train the linearised model for each of ``times`` (steps); arguments as for ``decompose``. Full-batch GD
    at a constant step (``flow=False``) needs every μ ≤ 2n for stability; larger μ diverge as the real run
    would."""
    return decompose(kernel, n_train, f0, y).at(times, flow)


def kernel_gd(kernel: torch.Tensor, n_train: int, f0: torch.Tensor, y: torch.Tensor, steps: int,
              step: float = 1.0) -> torch.Tensor:
    """The same linearised training iterated explicitly: f ← f + (step/n)·K(·, X)(y − f(X)), ``steps`` times;
    (steps + 1, n+m, C) outputs on every point. The reference the closed form is tested against (``step`` < 1
    with steps/step… approximates gradient flow)."""
    kernel, n = kernel.double(), int(n_train)
    f = f0.double().reshape(kernel.shape[0], -1).clone()
    y = y.double().reshape(n, -1)
    out = [f.clone()]
    for _ in range(steps):
        f = f + (step / n) * kernel[:, :n] @ (y - f[:n])
        out.append(f.clone())
    return torch.stack(out)
