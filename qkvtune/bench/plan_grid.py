"""``qkvtune bench plan`` — how good are ``qkvtune plan``'s predictions, measured against a real grid.

Per task, the plan's grid — candidates (targets × λ) × the learning rates of the method family's grid — is
trained for real with the claims suite's fair settings (``configs/claims/suite.yaml``: its family settings, its
validation split, its gate and budget ladder, runs cached by their settings; ``runner.Runner``), on every seed of
``--seeds``, so the real scores' reliability is measured: 1 − (the seeds' variance of a mean) / (the variance
across grid points). The plan is made once per task, at the reference's (q, v, λ = 1) searched rate and the
budget the gate chose, choosing among the same rates; its pick (targets, λ, rate, stop) is trained as plan.yaml
says. Reported against the issue's targets:
- Spearman(predicted, real) over the full grid (candidates × rates), and over candidates each at its best rate;
- every real run that diverged predicted unstable, and no predicted-unstable candidate the real best;
- the pick's test score against the grid's best's (SFT: validation loss);
- plan + pick against the grid's compute; ``--cost-ns`` the kernel against one LoRA epoch;
- attention only vs MLP only vs all-linear, real (with an interval) beside predicted;
- ``--check-budget TASK``: the plan made at the task's first budget, and one real run of the reference at the
  budget it names.

SFT tasks (``sft/<file>``, the claims suite's id: the file's records under ``<data-dir>/text/`` as chats through the
model's template) are judged by validation loss. The reference passes the gate when its validation loss is 2 %
under the pretrained model's, and their budget is not laddered: the suite's ``sft`` family, sized down by
``LM_SIZE`` for a grid on 2 CPU cores (``sft.key=value`` changes either).
"""

from __future__ import annotations

import math
import os
import statistics
import time

from ..config import ConfigError
from ..data.families import task_kind
from ..plan import REFERENCE
from ..task import QA_GENERATION

LM_SIZE = {  # the suite's sft family (SmolLM2, Alpaca chats, loss on responses) sized for a grid on 2 CPU cores
    "max_train_samples": 400, "val_size": 48, "max_length": 128, "eval_batch_size": 8, "max_steps": 40,
    "eval_steps": 20,
}
LM_GATE = 0.02  # a language model learns when its validation loss is this much (relative) under the pretrained's
PLAN_CLAIM_BASE = {"method": "lora", "rank": 8, "alpha": 16}  # every run of the real grid


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def reliability(points: list[list[float]]) -> float:
    """Measured reliability of the mean over seeds of each grid point: 1 − (the mean squared standard error of
    the points' means, from the spread of their seeds) / (the variance of the means across points). ≤ 0: the
    points' differences are within their seeds' spread, and no ranking can correlate with them reliably."""
    full = [p for p in points if len(p) >= 2 and all(math.isfinite(v) for v in p)]
    if len(full) < 2:
        return math.nan
    means = [statistics.fmean(p) for p in full]
    noise = statistics.fmean(statistics.variance(p) / len(p) for p in full)
    spread = statistics.pvariance(means)
    return 1.0 - noise / spread if spread > 0 else math.nan


def best_step(run, task: str) -> int | None:
    """The evaluation step with the best validation score (the first of equal ones)."""
    from .scores import higher_better, score_of

    sign = 1 if higher_better(task) else -1
    curve = [(h["step"], v) for h in run.history if (v := score_of(h, task)) is not None]
    return max(curve, key=lambda p: (sign * p[1], -p[0]))[0] if curve else None


def plan_claim(cands: list):
    """The grid as a claim of the runner: one arm per candidate (its targets and λ), the reference q,v λ=1. A whole
    λ is written as an int, as the claims' YAML writes it, so runs hash alike and the two benchmarks share them."""
    from .suite import Claim

    def whole(v):
        return int(v) if isinstance(v, float) and v.is_integer() else v

    arms = {c.name: {k: whole(v) for k, v in c.settings().items()} for c in cands}
    return Claim(id="plan", title="plan against a real grid", tasks=[], arms=arms, base=dict(PLAN_CLAIM_BASE),
                 reference=REFERENCE.name)


def grid_rates(ctx, claim, task: str) -> list[float]:
    """The learning rates of the grid: the method family's (the suite's ``lr_grid``, as the runner searches)."""
    from ..deltas import delta_class

    first = ctx.settings(claim, task, claim.ref, ctx.seeds[0])
    family = delta_class(first.get("method", "lora")).rate_family
    values = (ctx.suite.get("lr_grid") or {}).get(family)
    if not values:
        raise ConfigError(f"suite.yaml: lr_grid has no values for method family {family!r}")
    return [float(v) for v in values]


def diverged(run, pretrained_loss: float | None = None) -> bool:
    """A run that lost its loss, or made it worse: a language model's validation loss at or above the pretrained
    model's (``pretrained_loss``; its two or three logged training losses, each a 20-step mean taken while it
    learns, are too few to read), a classifier's last logged training loss at or above its first."""
    losses = [h["loss"] for h in run.history if "loss" in h and "eval_loss" not in h]
    if not losses or not all(math.isfinite(v) for v in losses) or not math.isfinite(run.val_score):
        return True
    if pretrained_loss is not None:
        return run.val_score >= pretrained_loss
    return len(losses) > 1 and losses[-1] >= 0.98 * losses[0]


def real_grid(ctx, claim, task: str, cands: list, rates: list[float], log,
              pretrained_loss: float | None = None) -> list[dict]:
    """Every candidate at every rate of the grid and every seed, at the task's budget (``ctx.budget``, set by the
    reference's gate and ladder): runs cached by their settings. Seed by seed, so a cut-short grid is whole for
    its first seeds. One record per run (a language model's ``diverged`` against ``pretrained_loss``)."""
    from .scores import score_of

    out = []
    for seed in ctx.seeds:
        for lr in rates:
            for c in cands:
                run = ctx.run(ctx.settings(claim, task, c.name, seed, lr), task, c.name)
                curve = [(h["step"], v) for h in run.history if (v := score_of(h, task)) is not None]
                losses = [(h["step"], h["loss"]) for h in run.history if "loss" in h and "eval_loss" not in h]
                out.append({"candidate": c.name, "lr": lr, "seed": seed, "val_score": run.val_score,
                            "test_score": run.score, "best_step": best_step(run, task), "seconds": run.seconds,
                            "diverged": diverged(run, pretrained_loss), "val_curve": curve, "train_loss": losses,
                            "dir": os.path.relpath(run.dir, ctx.out)})
        log(f"{task}: grid seed {seed} done ({len(cands)} candidates × {len(rates)} rates)")
    return out


# --- language-model tasks: their validation loss, per example ------------------------------------------------

def example_losses(model, examples: list, collator, batch_size: int = 8) -> list[tuple[float, int]]:
    """(sum of token cross-entropies, trained tokens) of each example, as the causal-LM loss counts them."""
    import torch

    from ..inference import evaluating

    device = next(model.parameters()).device
    out = []
    with torch.no_grad(), evaluating(model):
        for s in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collator(examples[s:s + batch_size]).items()}
            labels = batch.pop("labels")
            logits = model(**batch).logits[:, :-1].float()
            target = labels[:, 1:]
            ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target.clamp(min=0), reduction="none")
            keep = target != -100
            out += [(float((ce * keep)[i].sum()), int(keep[i].sum())) for i in range(len(target))]
    return out


def validation_losses(settings: dict, run_dir: str | None) -> list[tuple[float, int]]:
    """Per-example validation losses of a finished run (``run_dir``) or of the pretrained model (None)."""
    from ..config import build_config
    from ..runs import open_run, pretrained

    if run_dir is None:
        cfg = build_config({**settings, "output_dir": "unused"})
        run = pretrained(cfg, n_train=1)
    else:
        run = open_run(run_dir)
    return example_losses(run.model, run.examples("eval"), run.task.collator)


def mean_loss(pairs: list[tuple[float, int]]) -> float:
    return sum(s for s, _ in pairs) / max(1, sum(c for _, c in pairs))


def lm_gate(ctx, claim, task: str, log) -> tuple[tuple[bool, str], float]:
    """The reference's rate searched on the first seed (the runner's arm), and whether its validation loss is
    ``LM_GATE`` under the pretrained model's; returns the gate and the pretrained model's validation loss."""
    res = ctx.arm(claim, task, claim.ref, {}, ctx.seeds[:1])
    base = mean_loss(validation_losses(ctx.settings(claim, task, claim.ref, ctx.seeds[0]), None))
    value = res.runs[ctx.seeds[0]].val_score
    need = base * (1 - LM_GATE)
    gate = (value <= need, f"validation loss (pretrained {base:.4f} − {LM_GATE:.0%}): {value:.4f} vs needed ≤ {need:.4f}")
    log(f"{task}: gate {'passed' if gate[0] else 'missed'} ({gate[1]})")
    return gate, base


def group_interval(ctx, claim, task: str, grid: list[dict], rows: dict, log, reps: int = 2000) -> dict:
    """Attention only vs MLP only vs all-linear on a loss task: each group's best grid point (by the mean
    validation loss over seeds), its per-example validation losses re-measured on every seed, and a paired
    bootstrap of each difference from the best group: validation examples resampled within each seed (a seed's
    validation split is its own), the same resample for every group, the seeds' losses averaged."""
    import numpy as np

    from ..plan import Candidate

    groups: dict[str, tuple] = {}
    for key, r in rows.items():
        g = Candidate(tuple(r["targets"]), r["lr_ratio"]).group
        if g in ("attention only", "MLP only", "all-linear") and (g not in groups or r["real"] < groups[g][1]):
            groups[g] = (key, r["real"])
    per = {}  # group -> seed -> (per-example loss sums, token counts)
    for g, (key, _) in groups.items():
        name, lr = key
        per[g] = {}
        for x in (x for x in grid if x["candidate"] == name and x["lr"] == lr):
            losses = validation_losses({}, os.path.join(ctx.out, x["dir"]))
            per[g][x["seed"]] = (np.array([s for s, _ in losses]), np.array([c for _, c in losses]))
    if not per:
        return {}
    rng = np.random.default_rng(0)
    first = next(iter(per.values()))
    seeds = sorted(first)
    idx = {s: rng.integers(0, len(first[s][0]), size=(reps, len(first[s][0]))) for s in seeds}

    def seed_loss(g, s, i=slice(None)):
        sums, counts = per[g][s]
        return sums[i].sum(-1) / counts[i].sum(-1)

    def boot(g):  # (reps,) the seeds' mean of each resample
        return np.mean([seed_loss(g, s, idx[s]) for s in seeds], axis=0)

    means = {g: float(np.mean([seed_loss(g, s) for s in seeds])) for g in per}
    best = min(means, key=means.get)
    out = {"best_group": best}
    for g in per:
        diff = boot(g) - boot(best)
        out[g] = {"point": f"{groups[g][0][0]} lr={groups[g][0][1]:g}", "loss": means[g],
                  "seeds": [float(seed_loss(g, s)) for s in seeds], "minus_best": means[g] - means[best],
                  "interval": [float(np.quantile(diff, 0.025)), float(np.quantile(diff, 0.975))]}
    log(f"{task}: groups {', '.join(f'{g} {v:.4f}' for g, v in means.items())}")
    return out


# --- one task ----------------------------------------------------------------------------------------------------

def bench_task(ctx, task: str, out: str, n: int, m: int, sketch_dim, cands: list, grid_cands: list, log,
               label_words: str | None = None, sketch: str = "kron", tokens: int = 4) -> dict:
    from ..config import build_config
    from ..data.families import main_metric
    from ..data.metrics import constant_score, greater_is_better
    from ..plan import plan, row_name

    claim = plan_claim(list(dict.fromkeys(grid_cands + cands)))
    metric = main_metric(task)
    lm = metric == "loss"
    base_loss = None
    if lm:
        gate, base_loss = lm_gate(ctx, claim, task, log)
        goal = None  # the plan's own: 2 % under the pretrained model's loss on its tokens, as the gate asks
    else:
        res, gate = ctx.reference(claim, task, claim.ref)
        log(f"{task}: gate {'passed' if gate[0] else 'missed'} ({gate[1]}), budget ×{ctx.budget.get(task, 1):g}")
        goal_metric, goal = gate_goal(ctx, claim, task)
        if goal_metric != metric:  # the grid is judged by the main metric: the plan's own goal there
            goal = None
    ref_lr = ctx.arm(claim, task, claim.ref, {}, ctx.seeds[:1]).lr
    rates = grid_rates(ctx, claim, task)
    grid = real_grid(ctx, claim, task, grid_cands, rates, log, base_loss)
    seed = ctx.seeds[0]
    settings = ctx.settings(claim, task, claim.ref, seed, ref_lr)
    plan_dir = os.path.join(out, "plans", task.replace("/", "-"))
    cfg = build_config({**settings, "output_dir": os.path.join(out, "unused")})
    summary = plan(cfg, plan_dir, n=n, m=m, sketch_dim=sketch_dim, cands=cands, lrs=rates, log=log,
                   label_words=label_words if task_kind(task) == QA_GENERATION else None, sketch=sketch,
                   tokens=tokens, goal=goal)
    rec = summary["recommended"]
    picked = ctx.run({**settings, "targets": rec["targets"], "lr_ratio": rec["lr_ratio"], "lr": rec["lr"],
                      "max_steps": rec["max_steps"], "patience": None,
                      **plan_budget_keys(settings, summary)}, task, "plan")
    key = (lambda v: v) if greater_is_better(metric) else (lambda v: -v)
    predicted = {(r["name"], r["lr"]): r for r in summary["candidates"]}
    rows = {}
    for x in grid:
        k = (x["candidate"], x["lr"])
        rows.setdefault(k, {"seeds": [], "tests": [], "diverged": [], "seconds": 0.0})
        rows[k]["seeds"].append(x["val_score"])
        rows[k]["tests"].append(x["test_score"])
        rows[k]["diverged"].append(x["diverged"])
        rows[k]["seconds"] += x["seconds"]
    for k, r in rows.items():
        p = predicted[k]
        r.update(real=statistics.fmean(r["seeds"]), predicted=p["best_score"], unstable=p["unstable"],
                 edge_ratio=p["edge_ratio"], planned_step=p["best_step"], targets=p["targets"],
                 lr_ratio=p["lr_ratio"], simulated=p["simulated_best"])
    keys = sorted(rows)
    full = spearman([rows[k]["predicted"] for k in keys], [rows[k]["real"] for k in keys])
    rel_full = reliability([rows[k]["seeds"] for k in keys])
    # each candidate at its best rate: real (mean over seeds) against the plan's best rate for it
    names = sorted({k[0] for k in keys})
    best_real = {c: max((k for k in keys if k[0] == c), key=lambda k: key(rows[k]["real"])) for c in names}
    best_pred = {c: max((r for r in summary["candidates"] if r["name"] == c and not r["unstable"]),
                        key=lambda r: key(r["best_score"]), default=None) for c in names}
    searched_pred = [best_pred[c]["best_score"] if best_pred[c] else summary["baseline"] for c in names]
    searched_real = [rows[best_real[c]]["real"] for c in names]
    rel_searched = reliability([rows[best_real[c]]["seeds"] for c in names])
    by_rate = [{"lr": lr, "spearman": spearman([rows[k]["predicted"] for k in keys if k[1] == lr],
                                               [rows[k]["real"] for k in keys if k[1] == lr])} for lr in rates]
    div = [k for k in keys if any(rows[k]["diverged"])]
    grid_best = max(keys, key=lambda k: key(rows[k]["real"]))
    seed_runs = {(x["candidate"], x["lr"]): x for x in grid if x["seed"] == seed}
    grid_best_seed = max(seed_runs, key=lambda k: key(seed_runs[k]["val_score"]))
    one_seed_seconds = sum(x["seconds"] for x in grid if x["seed"] == seed)
    all_seconds = sum(x["seconds"] for x in grid)
    plan_seconds = summary["seconds"]["total"]
    if lm:
        pick_value, best_value = picked.val_score, seed_runs[grid_best_seed]["val_score"]
        pick_gap = (pick_value - best_value) / best_value  # relative: ≤ 0.02 is the target
    else:
        pick_value, best_value = picked.score, seed_runs[grid_best_seed]["test_score"]
        pick_gap = pick_value - best_value  # ≥ −0.01 is the target
    result = {
        "task": task, "metric": metric, "gate": list(gate), "budget": ctx.budget.get(task, 1), "seeds": ctx.seeds,
        "rates": rates, "reference_lr": ref_lr, "goal": goal, "pretrained_loss": base_loss,
        "constant": summary["baseline"] if lm else constant_score(metric, ctx.labels(settings)["validation"]),
        "plan": {k: summary[k] for k in ("time_scale", "readout", "n_train", "n_val", "groups", "budget",
                                         "recommended", "parameters", "update_rule", "lrs")},
        "verdict": summary_sentence(summary), "plan_dir": os.path.relpath(plan_dir, out),
        "rows": [{"candidate": k[0], "lr": k[1], **{f: rows[k][f] for f in (
            "real", "seeds", "tests", "predicted", "simulated", "unstable", "edge_ratio", "diverged", "planned_step")}}
            for k in keys],
        "spearman_full": full, "reliability_full": rel_full, "points": len(keys),
        "spearman_searched": spearman(searched_pred, searched_real), "reliability_searched": rel_searched,
        "searched": {c: {"real_lr": best_real[c][1], "real": rows[best_real[c]]["real"],
                         "predicted_lr": best_pred[c]["lr"] if best_pred[c] else None,
                         "predicted": searched_pred[i]} for i, c in enumerate(names)},
        "by_rate": by_rate,
        "diverged": [{"candidate": k[0], "lr": k[1], "predicted_unstable": rows[k]["unstable"],
                      "edge_ratio": rows[k]["edge_ratio"]} for k in div],
        "unstable_best": rows[grid_best]["unstable"], "grid_best": {"candidate": grid_best[0], "lr": grid_best[1],
                                                                     "real": rows[grid_best]["real"]},
        "pick": {"name": row_name({"name": next(c.name for c in cands if list(c.targets) == rec["targets"]
                                                and c.lr_ratio == rec["lr_ratio"]), "lr": rec["lr"]}),
                 "max_steps": rec["max_steps"], "predicted": rec["predicted_val_score"], "value": pick_value,
                 "val": picked.val_score, "test": picked.score, "seconds": picked.seconds, "dir": picked.dir},
        "grid_best_seed": {"candidate": grid_best_seed[0], "lr": grid_best_seed[1], "value": best_value},
        "pick_gap": pick_gap, "plan_seconds": plan_seconds, "plan_phases": summary["seconds"],
        "grid_seconds_one_seed": one_seed_seconds, "grid_seconds_all": all_seconds,
        "compute_ratio": one_seed_seconds / (plan_seconds + picked.seconds),
        "compute_ratio_all": all_seconds / (plan_seconds + picked.seconds),
        # the same in runs, measured back to back in this invocation (the plan, then its pick): the grid's runs were
        # timed over hours of a shared machine's changing load, the plan and its run within minutes of each other
        "grid_runs_one_seed": len(seed_runs), "plan_in_runs": plan_seconds / picked.seconds,
        "compute_ratio_runs": len(seed_runs) / (1 + plan_seconds / picked.seconds),
    }
    if lm:
        result["groups_real"] = group_interval(ctx, claim, task, grid, {k: {**rows[k]} for k in keys}, log)
    log(f"{task}: spearman full {full:.3f} (reliability {rel_full:.2f}), searched {result['spearman_searched']:.3f} "
        f"(reliability {rel_searched:.2f}); pick gap {pick_gap:+.4f}; compute ×{result['compute_ratio']:.1f}")
    return result


def gate_goal(ctx, claim, task: str) -> tuple[str, float]:
    """The metric the suite's gate reads on the task and the validation score it asks of the reference, as the
    plan's goal (accuracy on an F1 task: the gate asks 10 points of accuracy over the constant predictor)."""
    from ..data.families import main_metric
    from .scores import majority

    rule = ctx.suite.get("gate") or {}
    name = main_metric(task)
    if name in ("matthews_correlation", "pearson"):
        return name, float(rule.get(name, 0.2 if name == "matthews_correlation" else 0.5))
    labels = ctx.labels(ctx.settings(claim, task, claim.ref, ctx.seeds[0]))
    base = majority(labels["validation"])
    if task_kind(task) == QA_GENERATION and labels["choices"]:
        base = max(base, 1 / len(labels["choices"]))
    return "accuracy", base + float(rule.get("over_constant", 0.10))


def plan_budget_keys(settings: dict, summary: dict) -> dict:
    """The budget keys plan.yaml changes when the configured one did not learn (steps; examples)."""
    b = summary["budget"]
    if b.get("found") == "steps" and settings.get("eval_steps"):
        return {"eval_steps": b["eval_steps"]}
    if b.get("found") == "examples" and settings.get("max_train_samples"):
        return {"max_train_samples": int(math.ceil(settings["max_train_samples"] * b["examples_factor"]))}
    return {}


def summary_sentence(summary: dict) -> str:
    from ..plan.report import verdict_sentence

    return verdict_sentence(summary)


def check_budget(ctx, task: str, out: str, n: int, m: int, sketch_dim, cands: list, log, sketch: str = "kron",
                 tokens: int = 4) -> dict:
    """The plan made at the task's first budget (×1, before the ladder) with the gate as its goal; where it names
    a longer budget, one real run of the reference (q,v λ=1 at the plan's rate) there, judged by the gate."""
    from ..config import build_config
    from ..plan import plan

    claim = plan_claim(cands)
    saved = ctx.budget.get(task)
    ctx.budget[task] = 1
    try:
        first = ctx.arm(claim, task, claim.ref, {}, ctx.seeds[:1])  # the reference searched at ×1 (cached)
        first_gate = ctx.gate(claim, task, claim.ref, first.runs[ctx.seeds[0]])
        settings = ctx.settings(claim, task, claim.ref, ctx.seeds[0], first.lr)
        goal_metric, goal = gate_goal(ctx, claim, task)
        m = max(m, len(ctx.labels(settings)["validation"]))  # the goal is the gate's: scored on its whole split
        plan_dir = os.path.join(out, "plans", task.replace("/", "-") + "-x1")
        cfg = build_config({**settings, "output_dir": os.path.join(out, "unused")})
        summary = plan(cfg, plan_dir, n=n, m=m, sketch_dim=sketch_dim, cands=cands, log=log, sketch=sketch,
                       tokens=tokens, goal=goal, metric=goal_metric, lrs=grid_rates(ctx, claim, task))
        b = summary["budget"]
        result = {"task": task, "configured_gate": list(first_gate), "goal": goal, "goal_metric": goal_metric,
                  "budget": b, "plan_dir": os.path.relpath(plan_dir, out), "recommended": summary["recommended"],
                  "plan_seconds": summary["seconds"]["total"]}
        if b.get("found") in ("steps", "examples"):
            factor = b.get("factor") or b.get("examples_factor")
            keys = {"max_steps": b.get("max_steps") or int(round(settings["max_steps"] * factor)),
                    **plan_budget_keys(settings, summary)}
            if b.get("found") == "examples":
                keys["eval_steps"] = int(round(settings["eval_steps"] * factor))
            ref_rows = [r for r in summary["extended"] if r["name"] == REFERENCE.name]
            lr = ref_rows[0]["lr"] if ref_rows else summary["recommended"]["lr"]  # the plan's rate for the reference
            check = ctx.run({**settings, "lr": lr, **keys}, task, claim.ref)
            result.update(check_settings=keys, check_lr=lr,
                          check_gate=list(ctx.gate(claim, task, claim.ref, check)), check_seconds=check.seconds)
            log(f"{task}: the plan named {keys}; the reference there: {result['check_gate']}")
        return result
    finally:
        if saved is None:
            ctx.budget.pop(task, None)
        else:
            ctx.budget[task] = saved


# --- cost --------------------------------------------------------------------------------------------------------

def cost_rows(cfg_settings: dict, ns: list[int], m: int, sketch_dim: int | None, out: str, log,
              sketch: str = "kron") -> list[dict]:
    """The plan's kernel (every linear kind, and the head) on n + m examples against one LoRA epoch over the same
    n, measured one after the other in this process, for each n."""
    from ..config import build_config
    from ..plan.readout import kernels
    from ..runs import pretrained
    from ..targets import ALL_LINEAR
    from ..train import train

    rows = []
    for n in ns:
        folder = f"{os.path.basename(str(cfg_settings['model']).rstrip('/'))}-n{n}"
        cfg = build_config({**cfg_settings, "max_train_samples": n, "output_dir": os.path.join(out, "cost", folder),
                            "overwrite": True})
        run = pretrained(cfg, n_train=n, n_eval=m, kinds=[ALL_LINEAR])
        data = run.examples("train", n) + run.examples("eval", m)
        t0 = time.perf_counter()
        _, used = kernels(run, data, output=run.kernel_output, heads=run.heads, sketch_dim=sketch_dim, sketch=sketch,
                          log=log)
        kernel = time.perf_counter() - t0
        kinds = sorted({t.kind for t in run.targets})
        del run
        epoch_cfg = build_config({**cfg.to_dict(), "targets": ["q", "v"], "max_steps": None, "epochs": 1,
                                  "eval_strategy": "no", "patience": None})
        t0 = time.perf_counter()
        metrics = train(epoch_cfg)
        wall = time.perf_counter() - t0
        epoch = float(metrics["train_runtime"])  # Trainer's loop: no model loading, no final evaluations
        rows.append({"model": cfg.model, "n": n, "m": m, "kernel_seconds": kernel, "lora_epoch_seconds": epoch,
                     "lora_run_wall_seconds": wall, "ratio": kernel / epoch, "sketch_dim": used,
                     "sketch": sketch if used else None, "examples": len(data), "kinds": kinds})
        log(f"cost {cfg.model} n={n}: kernel {kernel:.1f} s, one LoRA epoch {epoch:.1f} s ({wall:.1f} s with "
            f"loading and final evaluations)")
    return rows


