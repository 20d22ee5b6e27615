"""Measures of the claims suite: the runs of one seed (task -> arm -> ``SuiteRun``) in, named quantities out; and
``without_delta``, every run scored with ΔW removed (the head-only baseline).

Each measure is one analysis of the papers, in the suite's terms. ``TRAINING_MEASURES`` train runs of their
own (the stopping rule needs a run at the rate the kernel sets); the others only read finished runs. Measures of
adapters read what training moved (claims suite v3): LoRA's B (zero at the start), and the product
B·(A − A₀) with A₀ the run's own initialisation rebuilt from its seed — A starts random and moves little in a
short run, so measures on A's row space measured the initialisation. ``CROSS_SEED`` measures also receive the
next seed's runs (``other``): a same-rank adapter trained with another seed is their control.
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


WITHOUT_DELTA_FILE = "without_delta.json"


def without_delta(run) -> dict:
    """The run scored with ΔW removed — its task head as trained, every delta off (``attach.heads_only``; for a
    causal LM, the pretrained model): ``val_score`` and ``score`` (the validation and test split's main metric)
    and the test split's per-example ``predictions`` ({"labels", "predictions"}, as test_predictions.json); for a
    loss also ``val_score_with``, the run's own validation loss computed the same way (token-weighted), so the
    gate compares like with like. Computed once and kept in the run folder."""
    from ..files import write_json

    path = os.path.join(run.dir, WITHOUT_DELTA_FILE)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from ..attach import heads_only
    from ..runs import open_run

    opened = open_run(run.dir)
    with heads_only(opened.model, opened.adapter):
        val, val_pred = _split_score(opened, run.task, "eval")
        test, test_pred = _split_score(opened, run.task, "test")
    out = {"val_score": val, "score": test, "predictions": test_pred}
    from .scores import higher_better

    if not higher_better(run.task):
        out["val_score_with"] = _split_score(opened, run.task, "eval")[0]
    write_json(path, out)
    return out


def _split_score(opened, task: str, split: str) -> tuple[float, dict]:
    """(main metric, {"labels", "predictions"}) of an opened run's model as it is now on ``split``."""
    from ..evaluation import predict, token_losses
    from .scores import score_predictions

    info, cfg = opened.info, opened.cfg
    if info.scored_by_generation:
        from ..data.answers import generation_accuracy

        recs = opened.task.generation_records
        records = recs["test"] if split == "test" or "validation" not in recs else recs["validation"]
        res = generation_accuracy(opened.model, opened.tokenizer, records, batch_size=cfg.eval_batch_size,
                                  max_new_tokens=cfg.max_new_tokens, choices=opened.task.answer_choices)
        labels, preds = [r["answer"] for r in records], res["predictions"]
    elif info.causal_lm:
        preds, labels = token_losses(opened.model, opened.examples(split), opened.task.collator, cfg.eval_batch_size)
    else:
        logits, y = predict(opened.model, opened.examples(split), opened.task.collator, cfg.eval_batch_size)
        labels = y.tolist()
        preds = logits[:, 0].tolist() if info.regression else logits.argmax(-1).tolist()
    return score_predictions(task, labels, preds), {"labels": labels, "predictions": preds}


def moved_factors(run) -> dict[str, dict]:
    """"module[kind]" -> {"B", "A_moved" (A − A₀), "A", "scale"} for each LoRA-style delta of a finished run, A₀
    its initialisation rebuilt from the run's own config and seed (``runs.build`` with the same seed draws the
    same head and factors; the data it needs is cut to a few rows, which draws nothing from the generator)."""
    import dataclasses

    from ..runs import build, open_run

    opened = open_run(run.dir, with_task=False)
    cfg = dataclasses.replace(opened.cfg, max_train_samples=8, max_eval_samples=8)
    init = build(cfg)
    start = {d.target.name: d.factors() for _, d in _iter(init.model, init.adapter)}
    out = {}
    for _, d in _iter(opened.model, opened.adapter):
        f = d.factors()
        if f is None or d.target.name not in start:
            continue
        a, b = f[0].detach().double(), f[1].detach().double()
        a0 = start[d.target.name][0].detach().double()
        out[d.target.name] = {"B": b, "A": a, "A_moved": a - a0, "scale": float(getattr(d, "scale", 1.0))}
    return out


def _iter(model, name):
    from ..attach import iter_deltas

    return list(iter_deltas(model, name))


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


def subspace(runs: dict, a: str, b: str, side: str = "B", control: tuple[str, str] | None = None,
             other: dict | None = None) -> dict:
    """LoRA §7.2 between the adapters of arms a (rank r_a) and b (rank r_b), per matrix kind (median over layers
    and tasks), on what training moved: ``side="B"`` compares B's column spaces (B starts at zero; side "A" is
    §7.2's A, kept for comparison with the paper). Quantities:

    * ``phi_top1:<kind>``: φ(1, 1), the overlap of the two adapters' top directions (same seed), and its closed-form
      random value 1/d (``phi_top1_over_random``);
    * ``phi_top1_other_seed:<kind>``: the same with arm b's adapter of *another seed* (``other``: the next seed's
      runs) — a same-rank adapter that shares neither initialisation nor data order, so an overlap that only a
      shared seed produced vanishes there;
    * ``phi_top1_control:<kind>``: φ(1, 1) of the ``control`` pair (a', b'), trained on shuffled labels (patience
      off, the same steps);
    * ``psi_bottom_over_random:<kind>``: the share of a's bottom direction inside b's subspace over its random value
      r_b/d (≈ 1 for a direction b does not hold; r_b/d·… up to d/r_b if b holds all of a), and
      ``psi_bottom_over_random_other_seed`` with b's adapter of another seed (same-seed pairs share what the seed
      drove, so their bottom directions overlap for that reason alone).
    Per layer values are kept as ``phi_top1:<kind>@<layer>``."""
    from ..runs import open_runs
    from ..analysis.subspace import adapter_factors, direction_shares, subspace_similarity

    def phis(x: str, y: str, y_runs: dict | None = None):
        vals = {}
        for task, by_arm in runs.items():
            partner = (y_runs or runs).get(task, {})
            if x not in by_arm or y not in partner:
                continue
            ra, rb = open_runs([by_arm[x].dir, partner[y].dir])
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
    if other:
        for kind, rows in phis(a, b, other).items():
            out[f"phi_top1_other_seed:{kind}"] = median([r["phi"] for r in rows])
            out[f"psi_bottom_over_random_other_seed:{kind}"] = median([r["psi_bottom"] / r["random_psi"] for r in rows])
    if control:
        for kind, rows in phis(*control).items():
            out[f"phi_top1_control:{kind}"] = median([r["phi"] for r in rows])
            if f"phi_top1:{kind}" in out:
                out[f"phi_top1_minus_control:{kind}"] = out[f"phi_top1:{kind}"] - out[f"phi_top1_control:{kind}"]
    return out


def amplification(runs: dict, arms: list[str]) -> dict:
    """LoRA §7.3 per arm and matrix kind (median over layers and tasks), on what training moved: U, V are the
    top-r singular vectors of M = s·B·(A − A₀) (``moved_factors``); ΔW = s·B·A itself has its row space in A's,
    which is mostly A's random initialisation after a short run, so its directions are random on that side by
    construction. ``factor:<arm>:<kind>`` = ‖ΔW‖_F / ‖UᵀWV‖_F; ``dirs_over_random`` = ‖UᵀWV‖_F over its value
    for random orthonormal directions, √(r²/(m·n))·‖W‖_F — free of ‖ΔW‖, so a control with a smaller update is
    compared fairly (> 1: W has M's directions more than chance). That random level grows in proportion to r, so
    the factor falls with r for random directions too: ``log_factor_over_random`` = log(factor / (‖ΔW‖_F over the
    random level)) = −log dirs_over_random is the factor with that growth taken out (its fall from r to r′ is the
    part the random level does not explain), and ``log_factor`` the plain log. ``factor_product`` and
    ``dirs_over_random_product``: the same on ΔW itself (v2's quantity). (v3's "another seed" control is gone: W
    is frozen, so W along another seed's directions is that seed's own value under another name.)"""
    from ..runs import open_runs
    from ..analysis.subspace import amplification as amp, delta_weights

    out = {}
    for arm in arms:
        rows = {}
        for task, by_arm in runs.items():
            if arm not in by_arm:
                continue
            (run,) = open_runs([by_arm[arm].dir])
            weights = delta_weights(run.model, run.adapter)
            moved = moved_factors(by_arm[arm])
            for key, (dw, w) in weights.items():
                kind = kind_of(key)
                row = {"product": amp(dw, w)}
                if key in moved:
                    f = moved[key]
                    m = f["scale"] * f["B"] @ f["A_moved"]
                    row["moved"] = _along(dw, w, m)
                rows.setdefault(kind, []).append(row)
        for kind, vals in rows.items():
            main = [v.get("moved", v["product"]) for v in vals]
            out[f"factor:{arm}:{kind}"] = median([v["factor"] for v in main])
            out[f"dirs_over_random:{arm}:{kind}"] = median([v["dirs_over_random"] for v in main])
            out[f"factor_product:{arm}:{kind}"] = median([v["product"]["factor"] for v in vals])
            out[f"dirs_over_random_product:{arm}:{kind}"] = median(
                [v["product"]["proj_delta_dirs"] / v["product"]["proj_random_expected"] for v in vals])
            out[f"log_factor:{arm}:{kind}"] = math.log(out[f"factor:{arm}:{kind}"])
            out[f"log_factor_over_random:{arm}:{kind}"] = -math.log(out[f"dirs_over_random:{arm}:{kind}"])
    return out


def _along(dw, w, directions) -> dict:
    """‖ΔW‖_F / ‖UᵀWV‖_F and ‖UᵀWV‖_F over its random expectation, with U, V the top-r singular vectors of
    ``directions`` (r: its numerical rank)."""
    from ..analysis.subspace import amplification as amp

    row = amp(directions.to(dw.dtype) if directions.dtype != dw.dtype else directions, w)
    proj = row["proj_delta_dirs"]
    return {"factor": float(dw.double().norm()) / proj if proj > 0 else math.inf,
            "dirs_over_random": proj / row["proj_random_expected"], "r": row["r"]}


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
                 max_steps: int = 480, evals_per_prediction: int = 4, most_evals: int = 48,
                 patience: int = 4) -> dict:
    """Sun & Raskutti's early-stopping rule against training, on a square loss (a regression task: the rule is
    stated for least squares). The kernel of the arm's matrices at the pretrained weights picks a stable SGD
    step (lr = lr_scale / λ_max(K/n)) and predicts T̂; the run then trains at that rate, evaluated every
    T̂/``evals_per_prediction`` steps (at most ``most_evals`` evaluations up to the cap), until its validation loss
    turns — ``patience`` evaluations with neither a lower loss nor a better score — or ``max_steps``, the stated
    cap. Per seed: the regret at T̂ (the validation loss there, interpolated between evaluations, over the curve's
    minimum), log2(T̂ / best step), ``turned`` (1 if the loss rose again after its minimum, 0 if the minimum is the
    last evaluation: truncation, not a minimum) and ``curve_range`` (highest over lowest loss)."""
    from ..analysis.stopping import predict_stopping

    ratios, regrets, preds, obs, ranges, turned, steps = [], [], [], [], [], [], []
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
        interval = max(1, math.ceil(max(t_hat, 1) / evals_per_prediction), math.ceil(max_steps / most_evals))
        settings.update(lr=lr, max_steps=max_steps, eval_strategy="steps", eval_steps=interval,
                        logging_steps=interval, patience=patience)
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
        turned.append(1.0 if best_step < curve[-1][0] and curve[-1][1] > best_loss else 0.0)
        steps.append(curve[-1][0])
        runs[task][arm] = run
    return {"abs_log2_pred_over_best": mean(ratios), "regret_at_prediction": mean(regrets),
            "predicted_step": mean(preds), "observed_best_step": mean(obs), "curve_range": mean(ranges),
            "turned": mean(turned), "steps_trained": mean(steps)}


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
CROSS_SEED = ("subspace",)  # these also read the next seed's runs (``other``)
TRAINING_MEASURES = {"ntk_stopping": ntk_stopping}  # these train runs of their own
