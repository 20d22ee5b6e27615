"""Measures of the claims suite: the runs of one seed (task -> arm -> ``Run``) in, named quantities out.

Each measure is one analysis of the papers, in the suite's terms. ``TRAINING_MEASURES`` train runs of their
own (the stopping rule needs a run at the rate the kernel sets); the others only read finished runs.
"""

from __future__ import annotations

import json
import math
import os
import statistics

import torch

from .scores import score_of


def mean(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def median(xs) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else math.nan


def kind_of(key: str) -> str:
    """"bert.encoder.layer.0.attention.self.query[q]" -> "q"."""
    return key.rsplit("[", 1)[-1].rstrip("]") if key.endswith("]") else "?"


def settings_of(run) -> dict:
    with open(os.path.join(run.dir, "claims_run.json")) as f:
        return json.load(f)["settings"]


def steps_to_target(runs: dict, arms: list[str], reference: str, fraction: float = 0.97) -> dict:
    """First evaluated step at which each arm's *validation* score reaches ``fraction`` × the reference arm's
    best validation score (per task, same seed); an arm that never does counts as one evaluation interval past
    its last step. Every arm is evaluated at the same steps (the suite's eval_steps)."""
    out = {}
    for arm in arms:
        steps = []
        for task, by_arm in runs.items():
            if reference not in by_arm or arm not in by_arm:
                continue
            ref = [v for h in by_arm[reference].history if (v := score_of(h, task)) is not None]
            curve = [(h["step"], v) for h in by_arm[arm].history if (v := score_of(h, task)) is not None]
            if not ref or not curve:
                continue
            target = fraction * max(ref)
            hit = next((s for s, v in curve if v >= target), None)
            interval = curve[1][0] - curve[0][0] if len(curve) > 1 else curve[0][0]
            steps.append(hit if hit is not None else curve[-1][0] + interval)
        out[f"steps:{arm}"] = mean(steps)
    return out


def subspace(runs: dict, a: str, b: str, side: str = "A", control: tuple[str, str] | None = None) -> dict:
    """LoRA §7.2 between the adapters of arms a (rank r_a) and b (rank r_b), per matrix kind (median over
    layers and tasks): φ(1, 1), the overlap of the two adapters' top directions, against its value for random
    subspaces (closed form: j/d = 1/d for φ(1, 1)) and, with ``control`` = (a', b'), against the same
    pair trained on shuffled labels; ψ_bottom, the share of a's bottom direction inside b's subspace, over
    its random value r_b/d. Per layer values are kept as ``phi_top1:<kind>@<layer>``."""
    from ..runs import open_runs
    from ..analysis.subspace import adapter_factors, direction_shares, subspace_similarity

    def phis(x: str, y: str):
        vals = {}
        for task, by_arm in runs.items():
            if x not in by_arm or y not in by_arm:
                continue
            ra, rb = open_runs([by_arm[x].dir, by_arm[y].dir])
            fa, fb = adapter_factors(ra.model, ra.adapter, side), adapter_factors(ra.model, rb.adapter, side)
            for key in fa:
                kind = kind_of(key)
                share = direction_shares(fa[key], fb[key], side)
                d = fa[key].shape[1 if side == "A" else 0]
                r_b = min(fb[key].shape)
                vals.setdefault(kind, []).append({"phi": float(subspace_similarity(fa[key], fb[key], side)[0, 0]),
                                                  "psi_bottom": float(share[-1]), "random_psi": r_b / d,
                                                  "random_phi": 1.0 / d, "key": key})
        return vals

    out = {}
    for kind, rows in phis(a, b).items():
        out[f"phi_top1:{kind}"] = median([r["phi"] for r in rows])
        out[f"phi_top1_random:{kind}"] = rows[0]["random_phi"]
        out[f"phi_top1_over_random:{kind}"] = out[f"phi_top1:{kind}"] / rows[0]["random_phi"]
        out[f"psi_bottom_over_random:{kind}"] = median([r["psi_bottom"] / r["random_psi"] for r in rows])
        for i, r in enumerate(rows):
            out[f"phi_top1:{kind}@{i}"] = r["phi"]
    if control:
        for kind, rows in phis(*control).items():
            out[f"phi_top1_control:{kind}"] = median([r["phi"] for r in rows])
            if f"phi_top1:{kind}" in out:
                out[f"phi_top1_minus_control:{kind}"] = out[f"phi_top1:{kind}"] - out[f"phi_top1_control:{kind}"]
    return out


def amplification(runs: dict, arms: list[str]) -> dict:
    """LoRA §7.3 per arm and matrix kind (median over layers and tasks): factor = ‖ΔW‖/‖UᵀWV‖ with U, V the top-r
    singular vectors of ΔW, and ‖UᵀWV‖ along ΔW's directions over its expected value for random orthonormal
    directions (closed form √(r²/(m·n))·‖W‖_F; > 1: W has ΔW's directions more than chance)."""
    from ..runs import open_runs
    from ..analysis.subspace import amplification as amp, delta_weights

    out = {}
    for arm in arms:
        rows = {}
        for task, by_arm in runs.items():
            if arm not in by_arm:
                continue
            (run,) = open_runs([by_arm[arm].dir])
            for key, (dw, w) in delta_weights(run.model, run.adapter).items():
                row = amp(dw, w)
                kind = kind_of(key)
                rows.setdefault(kind, []).append((row["factor"], row["proj_delta_dirs"] / row["proj_random_expected"]))
        for kind, vals in rows.items():
            out[f"factor:{arm}:{kind}"] = median([v[0] for v in vals])
            out[f"dirs_over_random:{arm}:{kind}"] = median([v[1] for v in vals])
    return out


def allocation(runs: dict, arm: str) -> dict:
    """Share of SMT's selected blocks per matrix kind (smt_allocation.json) and V's lead over the next kind."""
    shares = {"q": [], "k": [], "v": []}
    for task, by_arm in runs.items():
        if arm not in by_arm:
            continue
        with open(os.path.join(by_arm[arm].dir, "smt_allocation.json")) as f:
            per_kind = json.load(f)["by_kind"]
        total = sum(per_kind.values()) or 1
        for k in shares:
            shares[k].append(per_kind.get(k, 0) / total)
    out = {f"share_{k}:{arm}": mean(v) for k, v in shares.items()}
    out[f"v_lead:{arm}"] = out[f"share_v:{arm}"] - max(out[f"share_q:{arm}"], out[f"share_k:{arm}"])
    return out


def pretrained_kernel(settings: dict, n: int, kinds: list[str] | None = None):
    """The empirical NTK of a run's slices at the pretrained weights on its first ``n`` training examples."""
    from ..runs import pretrained
    from ..analysis.ntk import empirical_ntk
    from ..config import build_config

    run = pretrained(build_config({**settings, "output_dir": "unused", "max_train_samples": n}), n_train=n, n_eval=1,
                     kinds=kinds)
    return empirical_ntk(run.model, run.examples("train", n), run.targets, collator=run.task.collator,
                         output=run.kernel_output)


def kernel_curve(runs: dict, arm: str, n_test: int = 128, sizes=(32, 64, 128, 256)) -> dict:
    """Sun & Raskutti's rate, like with like: the learning curve of the pretrained kernel itself (kernel
    regression on the first n training examples, ridge chosen per n on the held-out examples, as early
    stopping would) against the rate −p/(p+1) that the kernel's eigenvalue decay λ_i ~ i^(−p) gives. The raw
    error also holds an irreducible part, which flattens the slope; the rate is defined for p > 1 only."""
    from ..analysis.kernel_regression import kernel_ridge
    from ..analysis.ntk import eigenvalues, fit_decay, rate_from_decay
    from ..analysis.samples import fit_slope

    slopes, rates, decays = [], [], []
    for task, by_arm in runs.items():
        if arm not in by_arm:
            continue
        settings = settings_of(by_arm[arm])
        n_all = max(sizes) + n_test
        res = pretrained_kernel(settings, n_all)
        k = res.kernel.double()
        r = (res.label_targets() - res.f0).double()
        r = r.reshape(len(r), -1)
        train_idx, test_idx = torch.arange(max(sizes)), torch.arange(max(sizes), min(n_all, len(k)))
        errors = []
        for n in sizes:
            idx = train_idx[:n]
            knn, ktn = k[idx][:, idx], k[test_idx][:, idx]
            best = min(float(((kernel_ridge(knn, r[idx], ktn, ridge=rho) - r[test_idx]) ** 2).mean())
                       for rho in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0))
            errors.append(best)
        slopes.append(fit_slope(list(sizes), errors))
        p = fit_decay(eigenvalues(k[train_idx][:, train_idx]))[0]
        decays.append(p)
        rates.append(-rate_from_decay(p))
    out = {"kernel_error_slope": mean(slopes), "kernel_rate": mean(rates), "decay_p": mean(decays)}
    out["slope_minus_rate"] = out["kernel_error_slope"] - out["kernel_rate"]
    return out


def task_vectors(runs: dict, arm: str, coef: float = 1.0) -> dict:
    """Task arithmetic on two tasks' adapters (same seed, same base), scored on each task's test split: the
    share of each task's gain over the base (task head alone, ΔW = 0) that survives θ₀ + τ₁ + τ₂ (addition) and
    θ₀ + τ₂ − τ₁ (negation of task 1: the target, whose gain should vanish, and task 2, the control, whose gain
    should stay)."""
    from ..runs import open_runs
    from ..analysis.task_vectors import TaskVector, apply, restore
    from ..attach import heads_only, set_adapter
    from ..evaluation import task_metrics
    from .scores import score_key

    tasks = [t for t in runs if arm in runs[t]]
    if len(tasks) < 2:
        return {}
    dirs = [runs[t][arm].dir for t in tasks[:2]]
    opened = open_runs(dirs, n_eval=settings_of(runs[tasks[0]][arm]).get("max_eval_samples"))
    model = opened[0].model
    vecs = [TaskVector.from_model(model, r.adapter) for r in opened]

    def score(i):
        metrics = task_metrics(model, opened[i].task, opened[i].examples("test"))
        return float(metrics[score_key(tasks[i])[len("eval_"):]])

    base, tuned = [], []
    for i in range(2):
        with heads_only(model, opened[i].adapter):
            base.append(score(i))
        set_adapter(model, opened[i].adapter)
        tuned.append(score(i))

    def retained(i, coefs):
        for v, c in zip(vecs, coefs):
            if c:
                apply(model, v, c)
        with heads_only(model, opened[i].adapter):
            s = score(i)
        restore(model)
        gain = tuned[i] - base[i]
        return (s - base[i]) / gain if abs(gain) > 1e-9 else math.nan

    return {"add_retained": mean([retained(0, [coef, coef]), retained(1, [coef, coef])]),
            "neg_target_retained": retained(0, [-coef, coef]), "neg_control_retained": retained(1, [-coef, coef]),
            "base_score": mean(base), "tuned_score": mean(tuned)}


def ntk_stopping(ctx, claim, seed: int, runs: dict, arm: str, n: int = 256, lr_scale: float = 1.0,
                 horizon_factor: float = 3.0, max_steps: int = 480, eval_points: int = 16) -> dict:
    """Sun & Raskutti's early-stopping rule against training. The kernel of the arm's matrices at the
    pretrained weights picks a stable SGD step (lr = lr_scale / λ_max(K/n)) and predicts T̂; the run trains
    past T̂ (horizon_factor × T̂) evaluating the validation loss. Reported: log2(T̂ / best step) and the regret
    at T̂, the validation loss there (interpolated between evaluations) over the minimum of the curve — on a
    flat curve a far-off T̂ costs little, and the regret says so."""
    from ..analysis.stopping import predict_stopping

    ratios, regrets, preds, obs, ranges = [], [], [], [], []
    for task in list(runs):
        settings = ctx.settings(claim, task, arm, seed)
        settings.update(max_train_samples=n)
        res = pretrained_kernel(settings, n)
        kernel = res.kernel.double()
        lam_max = float(torch.linalg.eigvalsh(kernel / len(kernel))[-1])
        # HF regression uses mean (f − y)², twice the rule's (1/2n)Σ(f − y)²: one step of lr is a kernel step of 2·lr
        loss_scale = 2.0 if res.labels.is_floating_point() else 1.0
        lr = float(f"{lr_scale / (loss_scale * lam_max):.3g}")  # rounded: a rerun finds the same run folder
        probe = predict_stopping(kernel, residuals=res.label_targets() - res.f0, lr=loss_scale * lr,
                                 total_steps=max_steps, scheduler="constant")
        t_hat = probe.step
        horizon = int(min(max_steps, max(32, math.ceil(horizon_factor * max(t_hat, 1)))))
        settings.update(lr=lr, max_steps=horizon, eval_strategy="steps", eval_steps=max(1, horizon // eval_points),
                        logging_steps=max(1, horizon // eval_points), patience=None)
        run = ctx.run(settings, task, arm)
        curve = [(h["step"], h["eval_loss"]) for h in run.history if "eval_loss" in h]
        if not curve:
            continue
        best_step, best_loss = min(curve, key=lambda p: p[1])
        preds.append(t_hat)
        obs.append(best_step)
        ratios.append(abs(math.log2(max(t_hat, 1) / best_step)))
        regrets.append(interpolate(curve, t_hat) / best_loss)
        ranges.append(max(v for _, v in curve) / best_loss)
        runs[task][arm] = run
    return {"abs_log2_pred_over_best": mean(ratios), "regret_at_prediction": mean(regrets),
            "predicted_step": mean(preds), "observed_best_step": mean(obs), "curve_range": mean(ranges)}


def interpolate(curve: list[tuple[int, float]], step: float) -> float:
    """The curve's value at ``step`` (linear between points; the end values beyond them)."""
    if step <= curve[0][0]:
        return curve[0][1]
    for (s0, v0), (s1, v1) in zip(curve, curve[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / (s1 - s0)
    return curve[-1][1]


MEASURES = {"steps_to_target": steps_to_target, "subspace": subspace, "amplification": amplification,
            "allocation": allocation, "kernel_curve": kernel_curve, "task_vectors": task_vectors}
TRAINING_MEASURES = {"ntk_stopping": ntk_stopping}  # these train runs of their own
