"""``plan``: the kernels, the calibration run, every candidate simulated at every rate, the budget and the
recommendation for one config, written out (``report``)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace

from ..analysis import AnalysisError
from ..config import ConfigError, TrainConfig
from ..deltas import delta_class, parameter_count
from ..optim import update_rule
from ..targets import ALL_LINEAR
from .candidates import REFERENCE, Candidate, candidates
from .readout import HEAD, default_goal, kernel_examples, kernels, kind_rates, reaches, targets_of, unit_kernels
from .report import write_plan
from .simulate import (EDGE, Setting, calibration_config, eval_steps_of, extend_budget, horizon, match_scale,
                       measured_growth, rank, row_name, simulate_grid)

GROUP_NAMES = ("attention only", "MLP only", "all-linear")


# --- the plan --------------------------------------------------------------------------------------------------

def plan(cfg: TrainConfig, out: str, *, n: int = 256, m: int = 128, sketch_dim: int | None = None,
         calibration_steps: int = 20, chunk_size: int = 16, cands: list[Candidate] | None = None,
         lrs: list[float] | None = None, label_words: str | None = None, tokens: int = 4, sketch: str = "kron",
         goal: float | None = None, metric: str | None = None, max_budget: int = 16, save_kernels: bool = False,
         log=print) -> dict:
    """Kernels, calibration, simulation of every candidate at every rate, budget and recommendation; writes
    plan.json, plan.md (+ PNG) and plan.yaml. Returns plan.json's content. ``metric`` scores a classifier's
    candidates by another metric than the task's main one (``goal`` is in it): e.g. accuracy on an F1 task."""
    from ..analysis.kernel_sim import loss_terms
    from ..analysis.ntk import eigenvalues, fit_decay, label_targets, outputs, rate_from_decay
    from ..data.metrics import constant_score
    from ..runs import open_run, pretrained
    from ..train import train

    method = delta_class(cfg.method)
    auto = cfg.lr == "auto"  # plan.yaml then trains at lr: auto (the kernel's rate is reported beside it)
    if method.needs_selection:  # its slices and blocks come from a warm-up, not from targets
        raise ConfigError(f"method: plan simulates updates on chosen matrices, not {cfg.method!r}'s selected blocks")
    try:
        method.kernel_factor(cfg, 8, 8)
    except NotImplementedError:
        raise ConfigError(f"method: {cfg.method} has no kernel at initialisation to plan with") from None
    cands = cands or candidates()
    lrs = sorted(set(lrs or method.rate_grid or (() if auto else (cfg.lr,))))
    rule, beta = update_rule(cfg)
    t0 = time.perf_counter()
    run = pretrained(cfg, n_train=n, n_eval=m, kinds=[ALL_LINEAR])
    readout = kernel_examples(run, n, m, label_words, tokens, log)
    if metric and metric != readout.metric:
        if readout.metric == "loss" or metric == "loss":
            raise ConfigError(f"metric: a language model's own loss is planned on its loss, not {metric}")
        readout.metric = metric
    if not readout.val:
        raise ConfigError("val_size: plan scores candidates on validation examples; the task has none")
    n, m = len(readout.train), len(readout.val)
    kinds_have = sorted({t.kind for t in run.targets})
    log(f"plan: eNTK of {len(run.targets)} slices ({', '.join(kinds_have)})"
        + (f" and the head ({', '.join(readout.heads)})" if readout.heads else "")
        + f" on {n} training + {m} validation points; {readout.what}")
    res, sketch_dim = kernels(run, readout.train + readout.val, output=readout.output, heads=readout.heads,
                              label_token_ids=readout.label_ids, collator=readout.collator, sketch_dim=sketch_dim,
                              sketch=sketch, chunk_size=chunk_size, log=log)
    n_out = res.f0.shape[1]
    labels = res.labels
    if save_kernels:  # every slice's kernel, f₀ and labels: to simulate again without the model
        from ..files import save_tensors

        os.makedirs(out, exist_ok=True)
        save_tensors(os.path.join(out, "plan_kernels.safetensors"),
                      {**{f"kernel.{k}": v for k, v in res.per_target.items()}, "f0": res.f0,
                       **({"labels": labels} if labels is not None else {}),
                       **({"groups": readout.groups} if readout.groups is not None else {})})
    if readout.loss != "token" and labels is None:
        raise AnalysisError("labels: the examples carry no per-example labels")
    if readout.loss in ("binary_ce", "ce", "mse"):
        y = targets_of(labels[:n], readout)
        val_labels = targets_of(labels[n:], readout)
    else:
        y, val_labels = None, None
    if readout.loss == "square":  # not produced above; kept for custom readouts
        y = label_targets(labels[:n], n_out)
    kinds = unit_kernels(res, run, readout, y, n)
    _, _, curvature = loss_terms(readout.loss, res.f0[:n], y)
    if readout.metric == "loss":
        baseline = float(loss_terms(readout.loss, res.f0[n:], None)[0].mean())
    else:
        baseline = constant_score(readout.metric, val_labels.numpy())
    goal = default_goal(readout.metric, baseline) if goal is None else goal
    kernel_seconds = time.perf_counter() - t0

    # the time scale from one short real run: how far it moved the training outputs
    t1 = time.perf_counter()
    calib_dir = os.path.join(out, "calibration")
    ref_cfg = calibration_config(cfg, calib_dir, calibration_steps, n)  # the data the kernel's points came from
    log(f"plan: calibration run, {calibration_steps} steps of {cfg.method} on q, v ({cfg.optim}, lr {cfg.lr})")
    train(ref_cfg)
    real = open_run(calib_dir, with_task=False)
    if auto:  # the rate lr: auto chose for the calibration run stands for lr where the kernel needs one
        cfg = replace(cfg, lr=real.cfg.lr)
        lrs = lrs or [cfg.lr]
    moved = float((outputs(real.model, readout.train, readout.collator, readout.output, readout.label_ids)
                   - res.f0[:n]).norm())
    kappa = measured_growth(real, cfg.lr, calibration_steps)
    del real
    scale = match_scale(kinds, kind_rates(kinds, REFERENCE, cfg, cfg.lr), n, res.f0, y, readout.loss,
                        calibration_steps, beta, kappa, moved)
    calibration_seconds = time.perf_counter() - t1
    log(f"plan: time scale s = {scale:.4g}, growth κ = {kappa:.4g} (the real run moved its training outputs "
        f"{moved:.4g}; s = 1 is the {rule} derivation)")

    # every candidate at every rate, at every evaluation step of the config's schedule
    t2 = time.perf_counter()
    total = horizon(cfg, run.tokenizer)
    every = eval_steps_of(cfg, total)
    st = Setting(kinds, n, res.f0, y, val_labels, readout, scale, kappa, beta, curvature, baseline)
    rows = rank(simulate_grid(st, cfg, [(c, lr) for c in cands for lr in lrs], total, every), readout.metric)
    budget = {"found": "configured", "factor": 1, "max_steps": total}
    if rows[0]["unstable"] or not reaches(readout.metric, rows[0]["best_score"], goal):
        log(f"plan: no candidate is predicted to reach {goal:.4g} ({readout.metric}) within {total} steps; "
            f"extending the horizon")
        budget = extend_budget(st, cfg, cands, rows, total, goal, max_budget, log)
        budget["max_steps_configured"] = total
    # the pick: at the extended horizon where it learns there (or with more examples at the cap), else as configured
    chosen = budget["rows"] if budget.get("found") in ("steps", "examples") else rows
    pick, default = keep_default(chosen, readout.metric, m)
    simulate_seconds = time.perf_counter() - t2

    kernel_all = sum(v for k, v in res.per_kind.items() if k != HEAD)
    eigs = eigenvalues(kernel_all[:n, :n])
    p, rng = fit_decay(eigs)
    params = parameter_counts(run, cands, cfg)
    groups = group_summary(rows, readout.metric)
    summary = {
        "model": cfg.model, "task": cfg.task, "method": cfg.method, "optimizer": cfg.optim, "update_rule": rule,
        "beta": beta, "lr": cfg.lr, "lrs": lrs, "n_train": n, "n_val": m, "readout": readout.what,
        "output": readout.output if isinstance(readout.output, str) else "token_margin", "loss": readout.loss,
        "metric": readout.metric, "label_words": label_words, "heads": readout.heads, "horizon": total,
        "baseline": baseline, "goal": goal, "kinds": kinds_have,
        "time_scale": {"scale": scale, "growth": kappa, "calibration_steps": calibration_steps, "moved": moved,
                       "rule": "step t moves the outputs by Σ_k s·η_k(t)·(1 + γ_k·(κ·Σ_{τ<t} η_k)^p)·K_k ℓ'/n "
                               "(Adam: averaged, bias-corrected)", "power": kinds.power, "edge": EDGE},
        "weights": kinds.detail, "candidates": rows, "ranking": [row_name(r) for r in rows],
        "parameters": params, "groups": groups,
        "budget": {k: v for k, v in budget.items() if k != "rows"},
        "extended": [{k: r[k] for k in ("name", "lr", "best_step", "best_score", "unstable")}
                     for r in budget.get("rows") or []],
        "recommended": {"targets": pick["targets"], "lr_ratio": pick["lr_ratio"],
                        "lr": "auto" if auto else pick["lr"], "kernel_lr": pick["lr"], **default,
                        "max_steps": pick["best_step"], "predicted_val_score": pick["best_score"],
                        "unstable": pick["unstable"], "reaches_goal": reaches(readout.metric, pick["best_score"], goal)
                        and not pick["unstable"]},
        "spectrum": {"eigenvalues": eigs.tolist(), "decay_exponent": p, "decay_range": list(rng),
                     "rate_exponent": rate_from_decay(p),
                     "per_kind": {k: eigenvalues(v[:n, :n]).tolist() for k, v in res.per_kind.items()},
                     "per_kind_trace": {k: float(v[:n, :n].trace()) for k, v in res.per_kind.items()}},
        "seconds": {"kernel": kernel_seconds, "calibration": calibration_seconds, "simulation": simulate_seconds,
                    "total": time.perf_counter() - t0},
        "sketch_dim": sketch_dim, "sketch": sketch if sketch_dim else None,
    }
    if budget.get("found") in ("steps", "examples"):
        summary["recommended"]["budget_factor"] = budget.get("factor") or budget.get("examples_factor")
    write_plan(summary, cfg, out)
    return summary


def score_noise(metric: str, score: float, m: int) -> float:
    """The standard error a validation score on ``m`` points carries, which no prediction can resolve below:
    a proportion's √(p(1−p)/m) (accuracy, F1 read as one), a correlation's (1 − r²)/√(m − 3), a mean loss's
    score/√m (per-token losses spread about as much as their mean)."""
    if metric == "loss":
        return abs(score) / math.sqrt(m)
    if metric in ("pearson", "spearmanr", "spearman", "matthews_correlation"):
        return (1 - min(score * score, 1.0)) / math.sqrt(max(1, m - 3))
    p = min(max(score, 0.0), 1.0)
    return math.sqrt(max(p * (1 - p), 1.0 / m) / m)


def keep_default(rows: list[dict], metric: str, m: int) -> tuple[dict, dict]:
    """(the row to recommend, why): the simplest strong default — all-linear, λ = 1 — unless the best stable row
    is predicted to beat it by more than twice the validation score's noise (``score_noise``): the plan's own
    benchmarks found the choice of targets moving results less than the seeds do, and the rate deciding."""
    from .readout import better

    key = better(metric)
    stable = [r for r in rows if not r["unstable"]] or rows
    top = stable[0]
    default = min((r for r in stable if r["targets"] == [ALL_LINEAR] and r["lr_ratio"] == 1),
                  key=lambda r: key(r["best_score"]), default=None)
    if default is None:
        return top, {"default": None}
    noise = score_noise(metric, default["best_score"], m)
    margin = key(default["best_score"]) - key(top["best_score"])  # > 0: the top row is predicted better
    if top is default or margin <= 2 * noise:
        return default, {"default": "all-linear λ=1", "default_kept": True, "margin": margin, "noise": noise,
                         "best_other": row_name(top)}
    return top, {"default": "all-linear λ=1", "default_kept": False, "margin": margin, "noise": noise}


def parameter_counts(run, cands: list, cfg: TrainConfig) -> dict[str, int]:
    """Trainable parameters of each candidate's targets under the configured method (heads aside)."""
    have = sorted({t.kind for t in run.targets})
    out = {}
    for c in cands:
        kinds = set(c.kinds(have))
        out[c.name] = parameter_count(cfg.method, cfg, [t for t in run.targets if t.kind in kinds])
    return out


def group_summary(rows: list[dict], metric: str) -> dict:
    """The best stable row of each of attention only, MLP only and all-linear."""
    out = {}
    for g in GROUP_NAMES:
        mine = [r for r in rank(rows, metric) if r["group"] == g]
        if mine:
            r = mine[0]
            out[g] = {"best": row_name(r), "score": r["best_score"], "unstable": r["unstable"]}
    return out


