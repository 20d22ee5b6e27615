"""The calibration run that sets the time scale, the schedule's horizon, every candidate at every rate simulated
as the linearised model trained on the run's loss (with the stability edge), and the budget extended where no
candidate learns."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from ..config import TrainConfig, build_config
from .readout import Kinds, Readout, better, kind_rates, metric_of, reaches, step_weights

BUDGETS = (2, 4, 8, 16, 32)    # the horizon's extensions, up to --max-budget


# --- calibration -----------------------------------------------------------------------------------------------



def calibration_config(cfg: TrainConfig, out_dir: str, steps: int, n: int) -> TrainConfig:
    """The short real run that sets the time scale: the config's method and optimizer on {q, v} at λ = 1, its head
    trained as configured, a constant rate, no evaluation, the kernel's first n training examples."""
    return build_config({**cfg.to_dict(), "targets": ["q", "v"], "lr_ratio": 1.0, "lr_q": None, "lr_k": None,
                         "lr_v": None, "lr_o": None, "max_steps": steps, "scheduler": "constant",
                         "warmup_ratio": 0.0, "eval_strategy": "no", "patience": None, "early_stopping": "none",
                         "max_train_samples": n, "save_total_limit": 2, "output_dir": out_dir,
                         "overwrite": True, "resume": False, "logging_steps": max(1, steps)})


def measured_growth(run, lr: float, steps: int) -> float:
    """κ: the root mean square the calibration run moved its method's first-moving parameters to (LoRA's B),
    per unit of Σ η (``Delta.moved_rms``); 0 for a method whose kernel does not grow."""
    from ..attach import iter_deltas

    values = [d.moved_rms() for _, d in iter_deltas(run.model, run.adapter)]
    values = [v for v in values if v is not None]
    return (sum(values) / len(values)) / (lr * steps) if values else 0.0


def simulate_kinds(kinds: Kinds, n: int, f0, y, loss: str, weights, record, beta: float, record_train=False):
    from ..analysis.kernel_sim import train_by_kinds

    return train_by_kinds(kinds.unit, n, f0, y, loss, weights, record, beta=beta, bias_correction=beta > 0,
                          record_train=record_train)


def match_scale(kinds: Kinds, rates: torch.Tensor, n: int, f0: torch.Tensor, y, loss: str, steps: int, beta: float,
                kappa: float, moved: float) -> float:
    """The s at which ``steps`` steps at the constant ``rates`` (K,) move the simulated training outputs by
    ``moved`` (‖f_T − f₀‖), by bisection on log s (the movement grows with s)."""
    sub = kinds.subset(torch.arange(n))
    shape = torch.ones(steps, dtype=torch.float64)

    def movement(s: float) -> float:
        w = step_weights(sub, rates, shape, s, kappa)[None]
        traj = simulate_kinds(sub, n, f0[:n], y, loss, w, [steps], beta, record_train=True)
        return float((traj.train_outputs[0, -1] - f0[:n].double().reshape(n, -1)).norm())

    lo, hi = 1e-8, 1.0
    while movement(hi) < moved and hi < 1e12:
        hi *= 10
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if movement(mid) < moved else (lo, mid)
        if hi / lo < 1 + 1e-4:
            break
    return math.sqrt(lo * hi)


# --- the schedule and the simulation of every candidate ---------------------------------------------------

def horizon(cfg: TrainConfig, tokenizer) -> int:
    """The run's length in optimizer steps: ``max_steps``, else ``epochs`` over its whole training set."""
    from ..analysis.stopping import steps_per_epoch
    from ..runs import task_data

    if cfg.max_steps:
        return cfg.max_steps
    n_train = len(task_data(cfg, tokenizer, cfg.max_train_samples, 1).train)
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.grad_accum)))


def eval_steps_of(cfg: TrainConfig, total: int) -> list[int]:
    """The steps the run evaluates at (``eval_steps`` with eval_strategy steps, else 50 points), and the last."""
    every = max(1, min(cfg.eval_steps or 1, total)) if cfg.eval_strategy == "steps" else max(1, total // 50)
    steps = list(range(every, total + 1, every))
    return steps if steps and steps[-1] == total else steps + [total]


@dataclass
class Setting:
    """Everything the simulation of one plan needs: the kinds' kernels, outputs at the pretrained weights,
    targets, the readout, the calibrated scale s and growth κ, the update's average β, the loss's curvature at
    f₀ on the training points, and the constant predictor's score."""

    kinds: Kinds
    n: int
    f0: torch.Tensor
    y: torch.Tensor | None
    val_labels: torch.Tensor | None
    readout: Readout
    scale: float
    kappa: float
    beta: float
    curvature: torch.Tensor
    baseline: float


EDGE = 2.0  # gradient descent's: where one step overshoots (see simulate_grid)


def simulate_grid(st: Setting, cfg: TrainConfig, pairs: list, total: int, every: list[int]) -> list[dict]:
    """Every (candidate, rate) of ``pairs``: its stability, and its predicted validation score and loss at every
    evaluation step of a ``total``-step schedule (the config's scheduler and warm-up), all trained side by side.

    Stability: the step at the peak rate times the largest eigenvalue of the kernel at initialisation in the
    loss's curvature (η·λ_max of D K D/n) against gradient descent's edge 2. The step is the derived one (s = 1):
    Adam's bias-corrected first steps are not averaged (m̂₁/√v̂₁ = sign g₁, every parameter moving η, as the
    derivation has it), while the calibrated s also absorbs what the kernel gains later (the growth of LoRA's
    A, heavy-tailed gradients). On a quadratic Adam's averaged steps stay stable up to 2(1+β₁)/(1−β₁)
    (``kernel_sim.edge``), but a nonlinear network thrown past its target in its first steps need not come back,
    where the linearised model does; the benchmark (benchmarks/PLAN.md) checks the edge against the runs that
    diverged."""
    from ..analysis.kernel_sim import loss_terms, top_eigenvalues
    from ..analysis.stopping import step_sizes

    shape = step_sizes(1.0, total, cfg.warmup_ratio, cfg.scheduler)  # the schedule relative to its peak rate
    key = better(st.readout.metric)
    rates = torch.stack([kind_rates(st.kinds, c, cfg, lr) for c, lr in pairs])  # (B, K)
    weights = step_weights(st.kinds, rates, shape, st.scale, st.kappa)             # (B, K, T)
    # the stability edge: the kernel at initialisation and the derived step (s = 1) at the peak rate
    sharp = top_eigenvalues(st.kinds.unit, float(shape.max()) * rates, st.curvature, st.n)
    traj = simulate_kinds(st.kinds, st.n, st.f0, st.y, st.readout.loss, weights, every, st.beta)
    rows = []
    for i, (c, lr) in enumerate(pairs):
        curve = metric_of(st.readout.metric, st.readout.loss, traj.val_outputs[i], st.val_labels)
        val_loss = loss_terms(st.readout.loss, traj.val_outputs[i], st.val_labels)[0].mean(-1)
        finite = bool(traj.finite[i]) and bool(torch.isfinite(curve).all())
        best = min(range(len(every)), key=lambda j: (key(float(curve[j])) if math.isfinite(float(curve[j]))
                                                     else math.inf, j))
        ratio = float(sharp[i]) / EDGE
        row = {"name": c.name, "targets": list(c.targets), "lr_ratio": c.lr_ratio, "lr": lr, "group": c.group,
               "sharpness": float(sharp[i]), "edge_ratio": ratio,
               "unstable": ratio > 1 or not finite, "steps": every, "val_score": curve.tolist(),
               "val_loss": val_loss.tolist(), "train_loss": traj.train_loss[i].tolist(),
               "simulated_best": float(curve[best])}
        if row["unstable"]:  # predicted to fail: the constant predictor, never recommended
            row.update(best_step=every[-1], best_score=st.baseline, loss_at_best=math.nan)
        else:
            row.update(best_step=every[best], best_score=float(curve[best]), loss_at_best=float(val_loss[best]))
        rows.append(row)
    return rows


def rank(rows: list[dict], metric: str) -> list[dict]:
    """Stable candidates first, by predicted score (then loss, then fewer kinds, then the smaller rate)."""
    key = better(metric)
    return sorted(rows, key=lambda r: (r["unstable"], key(r["best_score"]),
                                       r["loss_at_best"] if math.isfinite(r["loss_at_best"]) else math.inf,
                                       len(r["targets"]), r["lr"]))


def row_name(row: dict) -> str:
    return f"{row['name']} lr={row['lr']:g}"


# --- budgets -------------------------------------------------------------------------------------------------

def extend_budget(st: Setting, cfg: TrainConfig, cands: list, rows: list, total: int, goal: float,
                  max_budget: int, log=print) -> dict:
    """When no candidate reaches ``goal`` in ``total`` steps: the horizon ×2, ×4, … up to ``max_budget`` (the
    evaluation interval with it) for each candidate at its best stable rate, first where one does; else, from
    the kernel's own learning curve (the best candidate at the cap on n/4, n/2 and n of its training points), how
    many more examples would. Returns what was found ("steps", "examples" or "none") with the rows at the
    extended horizon."""
    metric = st.readout.metric
    by_name = {c.name: c for c in cands}
    best = {}
    for r in rank(rows, metric):  # each candidate's best stable rate (the first rate if none is stable)
        best.setdefault(r["name"], r)
    pairs = [(by_name[name], r["lr"]) for name, r in best.items() if not r["unstable"]]
    interval = eval_steps_of(cfg, total)[0]
    ext = None
    for factor in [f for f in BUDGETS if f <= max_budget]:
        steps = total * factor
        every = list(range(interval * factor, steps + 1, interval * factor)) or [steps]
        every = every if every[-1] == steps else every + [steps]
        ext = rank(simulate_grid(st, cfg, pairs, steps, every), metric) if pairs else []
        if not ext:
            break
        top = ext[0]
        log(f"plan: ×{factor} ({steps} steps): best {row_name(top)} predicted {top['best_score']:.4g}")
        if not top["unstable"] and reaches(metric, top["best_score"], goal):
            return {"found": "steps", "factor": factor, "max_steps": steps, "eval_steps": interval * factor,
                    "rows": ext}
    out = {"found": "none", "factor": None, "rows": None, "cap": max_budget}
    if not ext:
        return out
    # the kernel's learning curve in n at the cap: is it examples that are missing?
    top = ext[0]
    cand = by_name[top["name"]]
    steps = total * max(f for f in BUDGETS if f <= max_budget)
    curve = []
    for frac in (4, 2, 1):
        k = max(2, st.n // frac)
        idx = torch.cat([torch.arange(k), torch.arange(st.n, len(st.f0))])
        sub = dataclasses.replace(st, kinds=st.kinds.subset(idx), n=k, f0=st.f0[idx],
                                  y=None if st.y is None else st.y[:k], curvature=st.curvature[:k])
        r = simulate_grid(sub, cfg, [(cand, top["lr"])], steps, [steps])[0]
        curve.append((k, r["simulated_best"]))
    out["learning_curve"] = curve
    found = examples_needed(curve, goal, metric)
    if found is not None:
        out["slope"], multiple = found
        if multiple <= max_budget:
            out.update(found="examples", examples_factor=multiple, rows=ext)
    return out


def examples_needed(curve: list[tuple[int, float]], goal: float, metric: str) -> tuple[float, float] | None:
    """How many times the examples reach ``goal``, from a learning curve [(n, score)]: the error (1 − score for
    a score bounded by 1, the loss itself for a loss) fitted as a power law c·n^(−slope) through the curve's
    ends. Returns (slope, multiple of the largest n), or None where the error does not fall with n."""
    err = (lambda v: v) if metric == "loss" else (lambda v: 1.0 - v)
    (n0, e0), (n1, e1), want = (curve[0][0], err(curve[0][1])), (curve[-1][0], err(curve[-1][1])), err(goal)
    if not (e1 > 0 and e0 > e1 and want > 0 and n1 > n0):
        return None
    slope = math.log(e0 / e1) / math.log(n1 / n0)
    return slope, max(1.0, (e1 / want) ** (1 / slope))


