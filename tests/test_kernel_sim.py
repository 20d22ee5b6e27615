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


def test_training_movement_from_the_eigenbasis_and_the_calibration_time():
    """‖f_τ − f₀‖ on the training points read off one eigendecomposition equals the explicit residuals', and
    the plan's calibration inverts it: the τ it finds moves the outputs by what was measured."""
    from qkvtune.plan import match_time

    per_kind, f0, g = _kernels()
    n = 10
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = rate_kernel(per_kind, {"q": 1.0, "v": 2.0})
    taus = [0.3, 2.0, 17.0]
    sim = simulate(k, n, f0, y, taus, flow=True)
    explicit = ((y - f0[:n])[None] - sim.train_residuals).flatten(1).norm(dim=1)
    assert torch.allclose(decompose(k, n, f0, y).train_movement(taus), explicit, atol=1e-12)
    moved = float(explicit[1])
    tau, how = match_time(k, n, f0, y, moved)
    assert how == "matched" and tau == pytest.approx(2.0, rel=1e-5)
    # past the square loss's reach (‖r₀‖ here: K has full rank): matched on the initial speed ‖K r₀‖/n
    far = float((y - f0[:n]).norm()) * 2
    tau, how = match_time(k, n, f0, y, far)
    assert how == "linear" and tau == pytest.approx(far * n / float((k[:n, :n] @ (y - f0[:n])).norm()), rel=1e-9)


def test_untuned_kinds_drop_out_and_zero_modes_move_linearly():
    per_kind, f0, g = _kernels()
    assert torch.equal(rate_kernel(per_kind, {"q": 0.5, "v": 0.0}), 0.5 * per_kind["q"])
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
