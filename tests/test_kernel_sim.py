"""Kernel-simulated fine-tuning (analysis.kernel_sim) against explicit references: kernel gradient descent
iterated step by step, gradient flow by small Euler steps, the linearised tiny network trained by gradient
descent with a rate per parameter group, and the tiny network itself trained by SGD at a small rate."""

import pytest
import torch
from torch.func import functional_call, jacrev

from qkvtune.analysis import AnalysisError
from qkvtune.analysis.kernel_sim import decompose, kernel_gd, rate_kernel, simulate


def _kernels(n_points=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = {k: torch.randn(n_points, d, generator=g, dtype=torch.float64) for k, d in (("q", 5), ("v", 9))}
    per_kind = {k: f @ f.T / f.shape[1] for k, f in feats.items()}
    f0 = torch.randn(n_points, 2, generator=g, dtype=torch.float64)
    return per_kind, f0, g


def test_closed_form_equals_kernel_gradient_descent_step_by_step():
    per_kind, f0, g = _kernels()
    n = 10
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = rate_kernel(per_kind, {"q": 0.3, "v": 1.2})  # η_V = 4·η_Q
    explicit = kernel_gd(k, n, f0, y, steps=25)
    sim = simulate(k, n, f0, y, times=range(26))
    assert torch.allclose(sim.val_outputs, explicit[:, n:], atol=1e-10)
    assert torch.allclose(sim.train_residuals, y[None] - explicit[:, :n], atol=1e-10)
    assert sim.train_loss[-1] < sim.train_loss[0]
    # gradient flow: the same ODE by Euler steps of 1/200 converges to the exponential form
    flow = simulate(k, n, f0, y, times=[3.0, 7.5], flow=True)
    euler = kernel_gd(k, n, f0, y, steps=1500, step=1 / 200)
    assert torch.allclose(flow.val_outputs[0], euler[600, n:], atol=2e-3)
    assert torch.allclose(flow.val_outputs[1], euler[1500, n:], atol=2e-3)


def test_training_movement_from_the_eigenbasis_and_the_calibration_scale():
    """‖f_τ − f₀‖ on the training points read off one eigendecomposition equals the explicit residuals', and the
    plan's calibration inverts the simulation: the scale it finds moves the outputs by what was measured."""
    from qkvtune.analysis.kernel_sim import train_linearised
    from qkvtune.plan.simulate import match_scale

    per_kind, f0, g = _kernels()
    n = 10
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = rate_kernel(per_kind, {"q": 1.0, "v": 2.0})
    taus = [0.3, 2.0, 17.0]
    sim = simulate(k, n, f0, y, taus, flow=True)
    explicit = ((y - f0[:n])[None] - sim.train_residuals).flatten(1).norm(dim=1)
    assert torch.allclose(decompose(k, n, f0, y).train_movement(taus), explicit, atol=1e-12)
    labels = (y[:, 0] > 0).long()
    margin = f0[:, :1]
    from qkvtune.analysis.kernel_sim import train_by_kinds
    from qkvtune.plan.readout import Kinds, step_weights

    kinds = Kinds(["q", "v"], torch.stack([per_kind["q"], per_kind["v"]]), torch.tensor([0.0, 30.0]), 1, {})
    rates = torch.tensor([0.01, 0.02], dtype=torch.float64)
    for beta, kappa in ((0.0, 0.0), (0.9, 0.0), (0.9, 0.5)):
        w = step_weights(kinds, rates, torch.ones(8, dtype=torch.float64), 37.0, kappa)
        if kappa:  # the growing kind's steps grow: 1 + γ·κ·Σ_{τ<t} η
            assert torch.allclose(w[1], 37.0 * 0.02 * (1 + 30.0 * kappa * 0.02 * torch.arange(8.0, dtype=torch.float64)))
        moved = train_by_kinds(kinds.unit, n, margin, labels, "binary_ce", w[None], [8], beta=beta,
                               bias_correction=beta > 0, record_train=True)
        distance = float((moved.train_outputs[0, -1] - margin[:n]).norm())
        assert match_scale(kinds, rates, n, margin, labels, "binary_ce", 8, beta, kappa, distance) == \
            pytest.approx(37.0, rel=1e-3)
    # per-kind steps with constant weights are the summed kernel's iteration
    one = train_by_kinds(kinds.unit, n, margin, labels, "binary_ce", torch.full((1, 2, 5), 0.3), [5])
    both = train_linearised(0.3 * (per_kind["q"] + per_kind["v"]), n, margin, labels, "binary_ce", [1.0] * 5, [5])
    assert torch.allclose(one.val_outputs[0], both.val_outputs, atol=1e-12)


def test_untuned_kinds_drop_out_and_zero_modes_move_linearly():
    per_kind, f0, g = _kernels()
    assert torch.equal(rate_kernel(per_kind, {"q": 0.5, "v": 0.0}), 0.5 * per_kind["q"])  # adding 0·K_v is exact
    with pytest.raises(AnalysisError, match="'k'"):
        rate_kernel(per_kind, {"k": 1.0})
    # a rank-deficient kernel (5 features, 10 points): the null modes give (1 − d)/μ → t/n, no division by 0
    n, y = 10, torch.randn(10, 2, generator=g, dtype=torch.float64)
    k = rate_kernel(per_kind, {"q": 1.0})
    sim = simulate(k, n, f0, y, times=[4.0])
    assert torch.isfinite(sim.val_outputs).all()
    assert torch.allclose(sim.val_outputs[0], kernel_gd(k, n, f0, y, steps=4)[-1, n:], atol=1e-10)


class Tiny(torch.nn.Module):
    """Two parameter groups standing in for W_q and W_v: f(x) = w·tanh(Q x) + V x (two outputs)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.q = torch.nn.Parameter(torch.randn(6, 4, generator=g, dtype=torch.float64) / 2)
        self.w = torch.randn(2, 6, generator=g, dtype=torch.float64) / 2
        self.v = torch.nn.Parameter(torch.randn(2, 4, generator=g, dtype=torch.float64) / 2)

    def forward(self, x):
        return torch.tanh(x @ self.q.T) @ self.w.T + x @ self.v.T


def test_linearised_network_trained_with_per_group_rates_matches_the_simulation():
    torch.manual_seed(0)
    net, n, m = Tiny(), 12, 6
    x = torch.randn(n + m, 4, dtype=torch.float64)
    y = torch.randn(n, 2, dtype=torch.float64)
    params = {k: p.detach() for k, p in net.named_parameters()}
    jac = jacrev(lambda p: functional_call(net, p, (x,)))(params)  # kind -> (n+m, 2, *shape)
    flat = {k: j.reshape(n + m, 2, -1) for k, j in jac.items()}
    rates = {"q": 0.05, "v": 0.2}
    f0 = net(x).detach()
    # the linearised model f = f₀ + J(θ − θ₀), trained by full-batch GD, one rate per group
    theta = {k: torch.zeros(j.shape[-1], dtype=torch.float64) for k, j in flat.items()}
    for _ in range(40):
        f = f0 + sum(torch.einsum("icp,p->ic", flat[k], theta[k]) for k in flat)
        resid = f[:n] - y
        for k in theta:
            theta[k] = theta[k] - rates[k] * torch.einsum("icp,ic->p", flat[k][:n], resid) / n
    f_lin = f0 + sum(torch.einsum("icp,p->ic", flat[k], theta[k]) for k in flat)
    # two coupled outputs: the kernel over (point, output) pairs, K_η = Σ_k η_k J_k J_kᵀ, written out
    k_full = sum(rates[k] * torch.einsum("icp,jdp->icjd", flat[k], flat[k]) for k in flat).reshape(2 * (n + m), -1)
    order = torch.arange(2 * (n + m)).reshape(n + m, 2)
    idx = torch.cat([order[:n].reshape(-1), order[n:].reshape(-1)])  # training (point, output) pairs first
    # simulate averages the loss over its 2n rows, the network's over n points: the kernel carries the factor 2
    sim = simulate(2 * k_full[idx][:, idx], 2 * n, f0.reshape(-1)[idx], y.reshape(-1), times=[40])
    pred_val = sim.val_outputs[0, :, 0].reshape(m, 2)
    assert torch.allclose(pred_val, f_lin[n:], atol=1e-9)
    # the real network trained by SGD (one rate per parameter group) at this small rate stays close to it
    opt = torch.optim.SGD([{"params": [net.q], "lr": rates["q"]}, {"params": [net.v], "lr": rates["v"]}])
    for _ in range(40):
        opt.zero_grad()
        (0.5 * (net(x[:n]) - y).pow(2).sum() / n).backward()
        opt.step()
    moved = (f_lin[n:] - f0[n:]).norm()
    assert (net(x[n:]).detach() - f_lin[n:]).norm() < 0.1 * moved


# --- the linearised model under the run's loss and optimizer (kernel_sim.train_linearised) -----------------

def _linear_net(n_points=16, seed=0):
    """Explicit per-group Jacobians of a network: the reference the function-space iteration is held to."""
    torch.manual_seed(seed)
    net = Tiny()
    x = torch.randn(n_points, 4, dtype=torch.float64)
    params = {k: p.detach() for k, p in net.named_parameters()}
    jac = jacrev(lambda p: functional_call(net, p, (x,)))(params)
    flat = {k: j.reshape(n_points, 2, -1)[:, :1] for k, j in jac.items()}  # one output: a margin
    return net, x, flat, net(x).detach()[:, :1]


def test_square_loss_iteration_equals_the_closed_form_and_batches():
    from qkvtune.analysis.kernel_sim import train_linearised

    per_kind, f0, g = _kernels()
    n = 10
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    ks = torch.stack([rate_kernel(per_kind, {"q": 0.3, "v": 1.2}), rate_kernel(per_kind, {"q": 1.0})])
    traj = train_linearised(ks, n, f0, y, "square", [1.0] * 25, [5, 25], record_train=True)
    for b in range(2):
        explicit = kernel_gd(ks[b], n, f0, y, steps=25)
        assert torch.allclose(traj.val_outputs[b, 1], explicit[25, n:], atol=1e-10)
        assert torch.allclose(traj.val_outputs[b, 0], explicit[5, n:], atol=1e-10)
        assert torch.allclose(traj.train_outputs[b, 1], explicit[25, :n], atol=1e-10)
    assert traj.finite.all() and traj.train_loss.shape == (2, 2)


def test_cross_entropy_gradient_descent_with_per_group_rates_on_the_linearised_network():
    """The linearised network f = f₀ + Σ_k J_k(θ_k − θ_k⁰) trained by explicit gradient descent on the binary
    cross-entropy of its margin, one rate per parameter group and a decaying schedule, equals the function-space
    iteration with K = Σ_k (η_k/η) J_k J_kᵀ and steps η_t."""
    from qkvtune.analysis.kernel_sim import train_linearised

    net, x, flat, f0 = _linear_net()
    n = 12
    y = (torch.arange(n) % 2).long()
    rates = {"q": 0.5, "v": 2.0}
    schedule = torch.linspace(1.0, 0.2, 30, dtype=torch.float64)
    theta = {k: torch.zeros(j.shape[-1], dtype=torch.float64) for k, j in flat.items()}
    for eta in schedule:
        f = f0 + sum(torch.einsum("icp,p->ic", flat[k], theta[k]) for k in flat)
        dl = torch.sigmoid(f[:n, 0]) - y.double()  # ∂/∂f of softplus(f) − y·f
        for k in theta:
            theta[k] = theta[k] - eta * rates[k] * torch.einsum("ip,i->p", flat[k][:n, 0], dl) / n
    f_lin = f0 + sum(torch.einsum("icp,p->ic", flat[k], theta[k]) for k in flat)
    kernel = sum(rates[k] * flat[k][:, 0] @ flat[k][:, 0].T for k in flat)
    traj = train_linearised(kernel, n, f0, y, "binary_ce", schedule, [30])
    assert torch.allclose(traj.val_outputs[0], f_lin[n:], atol=1e-10)


def test_adam_with_a_frozen_preconditioner_is_the_averaged_function_space_iteration():
    """Adam's update with its second moment frozen — m_t = β m_{t−1} + (1 − β) g_t, θ ← θ − η_t P m_t/(1 − β^t),
    P a fixed diagonal per parameter — on the linearised network equals the function-space iteration with the
    momentum average and K_P = J P Jᵀ, bias correction included (binary cross-entropy of the margin)."""
    from qkvtune.analysis.kernel_sim import train_linearised

    net, x, flat, f0 = _linear_net(14)
    J = torch.cat([j[:, 0] for j in flat.values()], -1)  # (points, parameters)
    n, beta = 10, 0.9
    y = torch.tensor([0, 1] * 5)
    P = torch.rand(J.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    theta, m = torch.zeros(J.shape[-1], dtype=torch.float64), torch.zeros(J.shape[-1], dtype=torch.float64)
    steps = [0.3] * 12
    for t, eta in enumerate(steps):
        f = f0[:, 0] + J @ theta
        g = J[:n].T @ (torch.sigmoid(f[:n]) - y.double()) / n
        m = beta * m + (1 - beta) * g
        theta = theta - eta * P * m / (1 - beta ** (t + 1))
    K = J @ torch.diag(P) @ J.T
    traj = train_linearised(K, n, f0, y, "binary_ce", steps, [len(steps)], beta=beta, bias_correction=True)
    assert torch.allclose(traj.val_outputs[0, :, 0], (f0[:, 0] + J @ theta)[n:], atol=1e-10)


def test_the_stability_edge_against_gradient_descent_on_a_quadratic():
    """Gradient descent on a quadratic of curvature a diverges exactly when η·a passes 2; with Adam's averaged
    gradients (β) when it passes 2(1 + β)/(1 − β). The kernel iteration on the square loss diverges where its
    top eigenvalue times the step passes the same edge (``top_curvature``)."""
    from qkvtune.analysis.kernel_sim import edge, top_curvature, train_linearised

    def run(eta_a, beta, steps=400):
        x, m = 1.0, 0.0
        for t in range(steps):
            g = x  # a = 1
            m = beta * m + (1 - beta) * g if beta else g
            x = x - eta_a * m
        return abs(x)

    for beta in (0.0, 0.5, 0.9):
        e = edge(beta)
        assert run(0.98 * e, beta) < 1.0 and run(1.02 * e, beta) > 1e3
    per_kind, f0, g = _kernels()
    n = 10
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = rate_kernel(per_kind, {"q": 1.0, "v": 1.0})
    sharp = top_curvature(k, torch.ones(n, dtype=torch.float64), n)  # square loss: curvature 1
    for beta in (0.0, 0.9):
        below = train_linearised(k, n, f0, y, "square", [0.97 * edge(beta) / sharp] * 600, [600], beta=beta)
        above = train_linearised(k, n, f0, y, "square", [1.03 * edge(beta) / sharp] * 600, [600], beta=beta)
        assert below.train_loss[-1] < 1e3 and (not above.finite or above.train_loss[-1] > 1e6)


def test_minibatch_gradient_norm_equals_every_batch_enumerated():
    """E‖ḡ‖² of minibatches of B distinct examples, each averaging its T points, from the kernel alone equals the
    mean over every such batch of the explicit gradient's squared norm; T = 1: one point per example."""
    import itertools

    from qkvtune.analysis.kernel_sim import minibatch_gradient_norm2

    g = torch.Generator().manual_seed(5)
    examples, T, B, P = 6, 3, 2, 7
    grads = torch.randn(examples * T, P, generator=g, dtype=torch.float64)  # ∇f of each point
    dl = torch.randn(examples * T, 1, generator=g, dtype=torch.float64)     # ℓ' of each point
    h = dl * grads
    groups = torch.arange(examples).repeat_interleave(T)
    exact = []
    for batch in itertools.combinations(range(examples), B):
        rows = torch.cat([torch.nonzero(groups == b)[:, 0] for b in batch])
        exact.append(float(h[rows].mean(0).pow(2).sum()))
    K = grads @ grads.T
    assert minibatch_gradient_norm2(K, dl, B, groups, T) == pytest.approx(sum(exact) / len(exact), rel=1e-10)
    one = [float(h[list(b)].mean(0).pow(2).sum()) for b in itertools.combinations(range(len(h)), 3)]
    assert minibatch_gradient_norm2(K, dl, 3) == pytest.approx(sum(one) / len(one), rel=1e-10)


def test_loss_terms_are_the_losses_and_their_derivatives():
    from qkvtune.analysis.kernel_sim import loss_terms

    torch.manual_seed(0)
    f = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 2, 1, 1, 0])
    value, grad, curv = loss_terms("ce", f, y)
    assert torch.allclose(value, torch.nn.functional.cross_entropy(f, y, reduction="none"))
    (auto,) = torch.autograd.grad(value.sum(), f)
    assert torch.allclose(grad, auto)
    hess = torch.autograd.functional.hessian(lambda z: torch.nn.functional.cross_entropy(z[None], y[:1])[()], f[0])
    assert float(curv[0]) == pytest.approx(float(torch.linalg.eigvalsh(hess)[-1]), rel=1e-9)
    m = torch.randn(5, 1, dtype=torch.float64, requires_grad=True)
    value, grad, curv = loss_terms("binary_ce", m, y.clamp(max=1))
    two = torch.cat([torch.zeros_like(m), m], 1)  # logits (0, f): the margin is f
    assert torch.allclose(value, torch.nn.functional.cross_entropy(two, y.clamp(max=1), reduction="none"))
    value, grad, curv = loss_terms("token", m, None)
    assert torch.allclose(value, torch.nn.functional.softplus(-m[:, 0]))
    (auto,) = torch.autograd.grad(value.sum(), m)
    assert torch.allclose(grad, auto)
    value, grad, _ = loss_terms("mse", m, torch.zeros(5, dtype=torch.float64))
    assert torch.allclose(value, m[:, 0] ** 2)
