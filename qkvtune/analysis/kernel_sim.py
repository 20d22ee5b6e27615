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


# --- the linearised model under the run's own loss and optimizer -------------------------------------------
#
# The closed form above is the square loss under gradient descent. A run minimises cross-entropy (or HF's mean
# squared error, or a language model's token loss) with Adam, whose first moment is an exponential average and
# whose second moment divides each parameter's step by its gradient's size. Both are exact in function space
# for the linearised model with a frozen preconditioner P: with M_t = J P m_t,
#     M_t = β M_{t−1} + (1 − β) K_P ℓ'(f_t)/n,   f_{t+1} = f_t − η_t M_t/(1 − β^t)   (bias-corrected; β = 0: GD)
# where K_P = J P Jᵀ. ``train_linearised`` iterates that on the n training points and carries the m validation
# points along (their outputs move by K_P(X′, X) ℓ'(f)/n), so any loss, schedule and momentum is one matrix–
# vector product per step. Unlike gradient flow, the iteration can be unstable: on a quadratic of curvature a it
# diverges once η·a passes ``edge(β)`` (2 for gradient descent, 2(1+β)/(1−β) with the average's momentum).

LOSSES = ("square", "mse", "binary_ce", "ce", "token")


def loss_terms(loss: str, f: torch.Tensor, y: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-point loss (…, N), its gradient in f (…, N, C), its largest curvature in f (…, N)) for outputs f
    (…, N, C): ``square`` ½‖f − y‖²; ``mse`` (f − y)², transformers' regression loss; ``binary_ce`` cross-entropy
    of a two-class classifier read as its margin f = z₁ − z₀, y ∈ {0, 1}: softplus(f) − y·f; ``ce`` softmax
    cross-entropy over C logits, y the class; ``token`` a language model's token loss softplus(−u) on the margin u
    of ``ntk.token_margin`` (no y: the observed token is the target)."""
    if loss == "square":
        r = f - y.reshape(f.shape[-2:]).to(f.dtype)
        return 0.5 * r.pow(2).sum(-1), r, torch.ones(f.shape[:-1], dtype=f.dtype)
    if loss == "mse":
        r = f - y.reshape(f.shape[-2:]).to(f.dtype)
        return r.pow(2).sum(-1), 2 * r, torch.full(f.shape[:-1], 2.0, dtype=f.dtype)
    if loss in ("binary_ce", "token"):
        u = f[..., 0]
        t = torch.ones_like(u) if loss == "token" else y.reshape(-1).to(f.dtype)
        value = torch.nn.functional.softplus(u) - t * u
        p = torch.sigmoid(u)
        return value, (p - t)[..., None], p * (1 - p)
    if loss == "ce":
        logp = torch.log_softmax(f, -1)
        p = logp.exp()
        onehot = torch.nn.functional.one_hot(y.long().reshape(-1), f.shape[-1]).to(f.dtype)
        hess = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]
        return -(logp * onehot).sum(-1), p - onehot, torch.linalg.eigvalsh(hess)[..., -1]
    raise AnalysisError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")


def edge(beta: float = 0.0) -> float:
    """The largest η·a at which the iteration is stable on a quadratic of curvature a: gradient descent 2; with an
    exponential average of the gradients (Adam's first moment, β₁) x_{t+1} = (1 + β − (1 − β)ηa) x_t − β x_{t−1},
    whose roots stay in the unit disc while (1 − β)ηa < 2(1 + β)."""
    if not 0 <= beta < 1:
        raise AnalysisError(f"beta: must be in [0, 1), got {beta}")
    return 2 * (1 + beta) / (1 - beta)


def top_curvature(kernel: torch.Tensor, curvature: torch.Tensor, n: int) -> float:
    """The largest eigenvalue of D K D / n on the training points, D = diag(√curvature): the sharpness of the
    linearised loss in the kernel's time; a step η is unstable where η times it passes ``edge``."""
    d = curvature.double().clamp(min=0).sqrt()
    k = kernel[:n, :n].double()
    m = d[:, None] * ((k + k.T) / 2) * d[None, :]
    return float(torch.linalg.eigvalsh(m)[-1]) / n


@dataclass
class Trajectory:
    steps: list[int]              # 1-based steps recorded
    val_outputs: torch.Tensor     # (…, R, m, C)
    train_loss: torch.Tensor      # (…, R) mean training loss
    finite: torch.Tensor          # (…,) False: the outputs left the floats (a diverging iteration)
    train_outputs: torch.Tensor | None = None  # (…, R, n, C) with ``record_train``


def train_linearised(kernel: torch.Tensor, n_train: int, f0: torch.Tensor, y: torch.Tensor | None, loss: str,
                     step_sizes, record, *, beta: float = 0.0, bias_correction: bool = False,
                     record_train: bool = False) -> Trajectory:
    """The linearised model trained on its ``n_train`` training points by the update above, for
    len(``step_sizes``) steps (η_t, in kernel time: the rate-weighted kernel already holds the per-kind rates
    relative to η), the remaining points carried along; outputs recorded after each step in ``record`` (1-based).
    ``kernel`` is (n+m) × (n+m) (or (n+m) × n), or a batch of them (…, n+m, ·) trained side by side, ``step_sizes``
    (T,) or (…, T); ``f0`` (n+m, C), ``y`` the training targets."""
    n = int(n_train)
    k = kernel.double()[..., :n]
    batch = k.shape[:-2]
    f = f0.double().reshape(k.shape[-2], -1).expand(*batch, -1, -1).clone()
    steps = torch.as_tensor(step_sizes, dtype=torch.float64)
    steps = steps.expand(*batch, steps.shape[-1])
    # momentum averages the kernel's moves; the step size scales the average
    return _iterate(f, n, y, loss, record, steps.shape[-1], lambda t, g: (k @ g / n, steps[..., t, None, None]),
                    beta, bias_correction, record_train)


def _iterate(f, n: int, y, loss: str, record, total: int, move_at, beta: float, bias_correction: bool,
             record_train: bool) -> Trajectory:
    """The iteration both trainers share: ``move_at(t, ℓ'(f on the training points))`` gives step t's move and
    the factor it is taken with (after the average of ``beta``); outputs recorded after the steps in ``record``,
    non-finite runs flagged and clamped."""
    batch = f.shape[:-2]
    want = sorted({int(s) for s in record})
    if want and (want[0] < 1 or want[-1] > total):
        raise AnalysisError(f"record: steps must lie in 1..{total}, got {want[0]}..{want[-1]}")
    y_train = None if y is None else y.reshape(n, -1) if y.is_floating_point() else y.reshape(n)
    momentum = torch.zeros_like(f)
    vals, trains, losses = [], [], []
    finite = torch.ones(batch, dtype=torch.bool)
    nxt = 0
    for t in range(total):
        _, g, _ = loss_terms(loss, f[..., :n, :], y_train)
        move, scale = move_at(t, g)
        if beta:
            momentum = beta * momentum + (1 - beta) * move
            move = momentum / (1 - beta ** (t + 1)) if bias_correction else momentum
        f = f - scale * move
        bad = ~torch.isfinite(f).flatten(len(batch)).all(-1)
        if bad.any():
            finite &= ~bad
            f = torch.nan_to_num(f, nan=0.0, posinf=1e30, neginf=-1e30)
        while nxt < len(want) and want[nxt] == t + 1:
            vals.append(f[..., n:, :].clone())
            if record_train:
                trains.append(f[..., :n, :].clone())
            losses.append(loss_terms(loss, f[..., :n, :], y_train)[0].mean(-1))
            nxt += 1
    d = len(batch)
    if vals:
        return Trajectory(want, torch.stack(vals, d), torch.stack(losses, d), finite,
                          torch.stack(trains, d) if trains else None)
    return Trajectory(want, f.new_zeros(*batch, 0, f.shape[-2] - n, f.shape[-1]), f.new_zeros(*batch, 0), finite)


def minibatch_gradient_norm2(kernel: torch.Tensor, dloss: torch.Tensor, batch: int,
                             groups: torch.Tensor | None = None, per_group: float = 1.0) -> float:
    """E‖ḡ‖² of a minibatch gradient ḡ — the mean of h_i = Σ_c ℓ'_ic ∇f_ic over the ``per_group`` points of each
    of ``batch`` examples drawn at random — from the kernel K_ij = ⟨∇f_i, ∇f_j⟩ of these points (n × n) and the
    loss gradients ``dloss`` (n, C): with D the mean of ⟨h_i, h_i⟩, W its mean over distinct points of one example
    (``groups`` says which) and A over points of different examples,
        E‖ḡ‖² = D/(B·T) + W·(T − 1)/(B·T) + A·(B − 1)/B      (T = ``per_group``; T = 1: classification).
    Adam divides each parameter's step by the root of this (over the parameters), which is what sets how fast a
    kind moves under it (``adam_weight``)."""
    n = len(dloss)
    h = (dloss.double() @ dloss.double().T) * kernel[:n, :n].double()
    eye = torch.eye(n, dtype=torch.bool)
    same = eye if groups is None else (groups[:, None] == groups[None, :])
    d = float(h.diagonal().mean())
    within = same & ~eye
    w = float(h[within].mean()) if within.any() else 0.0
    across = ~same
    a = float(h[across].mean()) if across.any() else 0.0
    b, t = float(batch), float(per_group)
    return d / (b * t) + w * (t - 1) / (b * t) + a * (b - 1) / b


def adam_weight(factor: float, moving: int, gradient_norm2: float) -> float:
    """How much one unit of rate moves the outputs along a block's weight kernel K under Adam, relative to that
    kernel: a method whose kernel at initialisation is ``factor``·K (``Delta.kernel_factor``) with ``moving``
    parameters that move there, each step scaled by 1/ρ with ρ² = factor·E‖ḡ‖²/moving the mean squared gradient
    of a parameter (``minibatch_gradient_norm2`` on K): factor/ρ = √(factor·moving/E‖ḡ‖²). (SGD: ``factor``.)"""
    if gradient_norm2 <= 0 or factor <= 0 or moving <= 0:
        return 0.0
    return (factor * moving / gradient_norm2) ** 0.5


def train_by_kinds(unit: torch.Tensor, n_train: int, f0: torch.Tensor, y: torch.Tensor | None, loss: str,
                   weights: torch.Tensor, record, *, beta: float = 0.0, bias_correction: bool = False,
                   record_train: bool = False) -> Trajectory:
    """``train_linearised`` with a kernel that changes from step to step as a weighted sum of fixed ones: step t
    of run b moves the outputs by Σ_k weights[b, k, t]·K_k ℓ'(f)/n (the average of ``beta`` taken over that
    move). ``unit`` (K, n+m, ·) are the kinds' kernels, ``weights`` (B, K, T) each run's step size per kind."""
    n = int(n_train)
    k = unit.double()[..., :n]
    weights = torch.as_tensor(weights, dtype=torch.float64)
    runs, kinds, total = weights.shape
    if k.shape[0] != kinds:
        raise AnalysisError(f"weights: {kinds} kinds, the unit kernels have {k.shape[0]}")
    f = f0.double().reshape(k.shape[-2], -1).expand(runs, -1, -1).clone()

    def move_at(t, g):  # the weights are the step sizes: momentum averages the weighted moves
        per_kind = (k.reshape(-1, n) @ g.permute(1, 0, 2).reshape(n, -1)).reshape(kinds, -1, runs, g.shape[-1])
        return torch.einsum("bk,knbc->bnc", weights[:, :, t], per_kind) / n, 1.0  # no (runs × n × n) kernel formed

    return _iterate(f, n, y, loss, record, total, move_at, beta, bias_correction, record_train)


def top_eigenvalues(unit: torch.Tensor, weights: torch.Tensor, curvature: torch.Tensor, n: int,
                    iterations: int = 60) -> torch.Tensor:
    """The largest eigenvalue of D (Σ_k w_bk K_k) D / n on the training points for each row b of ``weights``
    (B, K), D = diag(√curvature), by power iteration (the matrices are positive semi-definite): the sharpness
    ``top_curvature`` computes for one, for many weightings of the same kinds' kernels without forming each."""
    d = curvature.double().clamp(min=0).sqrt()
    k = unit.double()[:, :n, :n]
    k = (k + k.transpose(1, 2)) / 2
    w = torch.as_tensor(weights, dtype=torch.float64)
    v = torch.ones(len(w), n, dtype=torch.float64) / n ** 0.5
    value = torch.zeros(len(w), dtype=torch.float64)
    for _ in range(iterations):
        per_kind = (k.reshape(-1, n) @ (d * v).T).reshape(len(k), n, len(w))  # (K, n, B)
        u = torch.einsum("bk,kib->bi", w, per_kind) * d
        value = (u * v).sum(1)
        v = u / u.norm(dim=1, keepdim=True).clamp(min=1e-300)
    return value / n
