"""``qkvtune bench plan`` — how good are ``qkvtune plan``'s predictions, measured against a real grid.

Per task, the plan's candidate grid (targets × λ) is trained for real with the claims suite's fair settings
(``configs/claims/suite.yaml``: its family settings and validation split, each candidate's learning rate
searched on its method family's grid, runs cached by their settings), and the plan is made on the same task at
the reference candidate's (q, v, λ = 1) chosen rate. Reported against the targets of the issue:
- Spearman correlation of predicted and real validation scores across candidates (target ≥ 0.6);
- the test score of the plan's pick (``plan.yaml`` trained as it is) against the test score of the candidate
  with the best real validation score (target: within 1 point);
- the real best step of the pick's candidate against the planned stop;
- the compute of the plan (+ the one run of its pick) against the grid's (target: ≥ 5× less).
``--cost-ns``: the plan's kernel time against one LoRA epoch over the same n, side by side, for each n.
"""

from __future__ import annotations

import json
import math
import os
import time

from ..config import ConfigError
from ..plan import Candidate, add_candidate_options, parse_candidates

REFERENCE = Candidate(("q", "v"), 1.0)  # the plan's calibration candidate; its searched rate is the plan's η_Q


def spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def reliability(values: list[float], m: int) -> float:
    """How much of the spread of accuracies measured on m examples is real: 1 − mean binomial variance
    p(1 − p)/m over the variance across candidates (≤ 0: the spread is no larger than sampling error, and no
    ranking, predicted or not, can correlate with it reliably)."""
    import statistics

    if len(values) < 2 or not m or statistics.pvariance(values) == 0:
        return math.nan
    noise = sum(v * (1 - v) / m for v in values) / len(values)
    return 1.0 - noise / statistics.pvariance(values)


def best_step(run, task: str) -> int | None:
    """The evaluation step with the best validation score (the first of equal ones)."""
    from .scores import score_of

    curve = [(h["step"], v) for h in run.history if (v := score_of(h, task)) is not None]
    return max(curve, key=lambda p: (p[1], -p[0]))[0] if curve else None


def bench_task(ctx, task: str, out: str, n: int, m: int, sketch_dim: int | None, cands: list, log,
               label_words: str | None = None, sketch: str = "kron") -> dict:
    from ..config import build_config
    from ..plan import plan
    from .suite import Claim
    from .scores import metric_name

    arms = {c.name: {"targets": list(c.targets), "lr_ratio": c.lr_ratio} for c in cands}
    claim = Claim(id="plan", title="plan against a real grid", tasks=[], arms=arms,
                  base={"method": "lora", "rank": 8, "alpha": 16}, reference=REFERENCE.name)
    seed = ctx.seeds[0]
    res, gate = ctx.reference(claim, task, claim.ref)
    log(f"{task}: gate {'passed' if gate[0] else 'missed'} ({gate[1]})")
    real = {}
    grid_seconds = 0.0
    for c in cands:
        arm = ctx.arm(claim, task, c.name, {}, [seed])
        run = arm.runs[seed]
        real[c.name] = {"lr": arm.lr, "val_score": run.val_score, "test_score": run.score,
                        "best_step": best_step(run, task), "seconds": run.seconds + arm.search_seconds,
                        "grid": [list(p) for p in arm.grid]}
        grid_seconds += real[c.name]["seconds"]
    settings = ctx.settings(claim, task, claim.ref, seed, real[claim.ref]["lr"])
    plan_dir = os.path.join(out, "plans", task.replace("/", "-"))
    cfg = build_config({**settings, "output_dir": os.path.join(out, "unused")})
    grid_rates = sorted({lr for k in real for lr, _ in real[k]["grid"]})
    summary = plan(cfg, plan_dir, n=n, m=m, sketch_dim=sketch_dim, cands=cands, log=log,
                   label_words=label_words if task.startswith("commonsense/") else None, other_rates=grid_rates,
                   sketch=sketch)
    rec = summary["recommended"]
    pick = next(c.name for c in cands if list(c.targets) == rec["targets"] and c.lr_ratio == rec["lr_ratio"])
    # the plan's pick trained as plan.yaml says (the plan's rate, its max_steps), the same seed and splits
    picked = ctx.run({**settings, "targets": rec["targets"], "lr_ratio": rec["lr_ratio"],
                      "max_steps": rec["max_steps"], "patience": None}, task, "plan")
    by_name = {r["name"]: r for r in summary["candidates"]}
    names = [c.name for c in cands]
    # the kernel's own question: every candidate at one η_Q, predicted at that rate, against the grid's runs there
    by_rate = []
    for lr in grid_rates:
        predicted = {k: summary["by_rate"][f"{lr:g}"][k]["best_score"] for k in names}
        at_lr = {k: v for k in names for g, v in real[k]["grid"] if g == lr}
        by_rate.append({"lr": lr, "spearman": spearman([predicted[k] for k in at_lr], list(at_lr.values())),
                        "predicted": predicted, "real": at_lr})
    grid_best = max(names, key=lambda k: real[k]["val_score"])
    plan_seconds = summary["seconds"]["total"]
    return {
        "task": task, "output": summary["output"], "label_words": summary["label_words"], "gate": list(gate),
        "seed": seed, "candidates": names,
        "predicted": {k: by_name[k]["best_score"] for k in names}, "planned_step": {k: by_name[k]["best_step"]
                                                                                  for k in names},
        "real": real, "spearman": spearman([by_name[k]["best_score"] for k in names],
                                           [real[k]["val_score"] for k in names]),
        "plan_lr": cfg.lr, "by_rate": by_rate,
        "reliability": reliability([real[k]["val_score"] for k in names], len(ctx.labels(settings)["validation"]))
        if metric_name(task) == "accuracy" else math.nan,  # binomial sampling error: accuracies only
        "pick": pick, "pick_test": picked.score, "pick_steps": rec["max_steps"],
        "grid_best": grid_best, "grid_best_test": real[grid_best]["test_score"],
        "pick_minus_grid_best": picked.score - real[grid_best]["test_score"],
        "pick_real_best_step": real[pick]["best_step"], "time_scale": summary["time_scale"]["scale"],
        "plan_seconds": plan_seconds, "pick_run_seconds": picked.seconds, "grid_seconds": grid_seconds,
        "compute_ratio": grid_seconds / (plan_seconds + picked.seconds),
        "plan_dir": os.path.relpath(plan_dir, out),
    }


def cost_rows(cfg_settings: dict, ns: list[int], m: int, sketch_dim: int | None, out: str, log,
              sketch: str = "kron") -> list[dict]:
    """The plan's kernel (all four kinds) on n + m examples against one LoRA epoch over the same n, measured one
    after the other in this process, for each n."""
    from ..config import build_config
    from ..plan import ALL_KINDS, kernels
    from ..runs import pretrained
    from ..train import train

    rows = []
    for n in ns:
        folder = f"{os.path.basename(str(cfg_settings['model']).rstrip('/'))}-n{n}"
        cfg = build_config({**cfg_settings, "max_train_samples": n, "output_dir": os.path.join(out, "cost", folder),
                            "overwrite": True})
        run = pretrained(cfg, n_train=n, n_eval=m, kinds=ALL_KINDS)
        data = run.examples("train", n) + run.examples("eval", m)
        t0 = time.perf_counter()
        _, used = kernels(run, data, output=run.kernel_output, sketch_dim=sketch_dim, sketch=sketch, log=log)
        kernel = time.perf_counter() - t0
        del run
        epoch_cfg = build_config({**cfg.to_dict(), "targets": ["q", "v"], "max_steps": None, "epochs": 1,
                                  "eval_strategy": "no", "patience": None})
        t0 = time.perf_counter()
        metrics = train(epoch_cfg)
        wall = time.perf_counter() - t0
        epoch = float(metrics["train_runtime"])  # Trainer's loop: no model loading, no final evaluations
        rows.append({"model": cfg.model, "n": n, "m": m, "kernel_seconds": kernel, "lora_epoch_seconds": epoch,
                     "lora_run_wall_seconds": wall, "ratio": kernel / epoch, "sketch_dim": used,
                     "sketch": sketch if used else None, "examples": len(data)})
        log(f"cost {cfg.model} n={n}: kernel {kernel:.1f} s, one LoRA epoch {epoch:.1f} s ({wall:.1f} s with "
            f"loading and final evaluations)")
    return rows


def write_report(results: list[dict], cost: list[dict], path: str, command: str, seconds: float) -> None:
    from ..analysis.plots import plot_lines
    from .report import machine

    out_dir = os.path.dirname(os.path.abspath(path))
    lines = ["# qkvtune plan against a real grid", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"wall time {seconds / 60:.1f} min (runs already in the run folder are read, not retrained)", "",
             "Targets: Spearman ≥ 0.6; the pick's test score within 1 point of the grid's best; ≥ 5× less compute.",
             ""]
    for r in results:
        ok = lambda b: "met" if b else "**not met**"  # noqa: E731
        read = f"the label words' margin ({r['label_words']}) at the end of the prompt" if r.get("label_words") \
            else f"the classification head's {r['output']} (the head itself is not in the kernel)"
        lines += [f"## {r['task']}", "", f"Gate: {r['gate'][1]}. Seed {r['seed']}; time scale s = {r['time_scale']:.4g}; "
                  f"the kernel reads {read}.",
                  "", "| | measured | target |", "|---|---|---|",
                  f"| Spearman(predicted, real validation) over {len(r['candidates'])} candidates, each at its "
                  f"searched rate | {r['spearman']:.3f} | ≥ 0.6: {ok(r['spearman'] >= 0.6)} |",
                  f"| reliability of those real scores: 1 − (sampling variance) / (variance across candidates) | "
                  f"{r['reliability']:.2f} | – (≤ 0: the candidates' differences are within sampling error) |",
                  *[f"| Spearman at one η_Q = {b['lr']:g} for all, predicted at that rate{' (the plan' + chr(39) + 's)' if b['lr'] == r['plan_lr'] else ''} | "
                    f"{b['spearman']:.3f} | – |" for b in r["by_rate"]],
                  f"| pick ({r['pick']}, {r['pick_steps']} steps) test − grid's best ({r['grid_best']}) test | "
                  f"{r['pick_test']:.4f} − {r['grid_best_test']:.4f} = {r['pick_minus_grid_best']:+.4f} | "
                  f"≥ −0.01: {ok(r['pick_minus_grid_best'] >= -0.01)} |",
                  f"| planned stop against the pick's real best step | {r['pick_steps']} vs "
                  f"{r['pick_real_best_step'] or '– (no score during training)'} | – |",
                  f"| compute: grid {r['grid_seconds'] / 60:.1f} min / (plan {r['plan_seconds']:.0f} s + its run "
                  f"{r['pick_run_seconds']:.0f} s) | {r['compute_ratio']:.1f}× | ≥ 5×: {ok(r['compute_ratio'] >= 5)} |",
                  "", "| candidate | predicted validation score | planned step | real validation score, searched | "
                  "its lr | real best step | real test score | " + " | ".join(
                      f"predicted / real at {b['lr']:g}" for b in r["by_rate"]) + " |",
                  "|---|---|---|---|---|---|---|" + "---|" * len(r["by_rate"])]
        for k in r["candidates"]:
            x = r["real"][k]
            at = " | ".join(f"{b['predicted'][k]:.3f} / {b['real'].get(k, math.nan):.3f}" for b in r["by_rate"])
            lines.append(f"| {k} | {r['predicted'][k]:.3f} | {r['planned_step'][k]} | {x['val_score']:.3f} | "
                         f"{x['lr']:g} | {x['best_step'] or '–'} | {x['test_score']:.4f} | {at} |")
        lines += ["", f"The plan itself: `{r['plan_dir']}/plan.md`.", ""]
    if cost:
        lines += ["## Cost of a plan's kernel against one LoRA epoch", "",
                  "Measured one after the other in one process: the eNTK of q, k, v and o of every layer on n "
                  "training + m validation examples (sketched where the gradients would pass 6 GiB) against one "
                  "epoch of LoRA (r = 8, q and v) over the same n training examples: Trainer's training loop, "
                  "without loading the model or the final evaluations (the whole run's wall time beside it).", "",
                  "| model | n (+ m validation) | sketch | kernel (q, k, v, o) | one LoRA epoch over n (whole run) | "
                  "kernel / epoch |", "|---|---|---|---|---|---|"]
        for c in cost:
            sk = f"{c['sketch']} {c['sketch_dim']}" if c["sketch_dim"] else "none"
            lines.append(f"| {c['model']} | {c['n']} (+{c['m']}) | {sk} | {c['kernel_seconds']:.1f} s | "
                         f"{c['lora_epoch_seconds']:.1f} s ({c['lora_run_wall_seconds']:.1f} s) | "
                         f"{c['ratio']:.2f} |")
        png = os.path.splitext(os.path.abspath(path))[0] + "_cost.png"  # beside its report, named after it
        curves = {}
        for model in dict.fromkeys(c["model"] for c in cost):
            rows = [c for c in cost if c["model"] == model]
            name = os.path.basename(str(model).rstrip("/"))
            curves[f"{name}: kernel"] = ([c["n"] for c in rows], [c["kernel_seconds"] for c in rows])
            curves[f"{name}: one LoRA epoch"] = ([c["n"] for c in rows], [c["lora_epoch_seconds"] for c in rows])
        plot_lines(curves, png, title="seconds against n", xlabel="n", ylabel="seconds", log="xy")
        lines += ["", f"![cost]({os.path.relpath(png, out_dir)})", ""]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    with open(os.path.splitext(path)[0] + ".json", "w", encoding="utf-8") as f:
        json.dump({"tasks": results, "cost": cost}, f, indent=2, default=str)


def cmd_plan(args) -> int:
    from ..config import parse_override
    from .report import command_line
    from .runner import Context, open_output, run_settings
    from .suite import Claim, discover_tasks, load_settings, parse_tasks

    for name in ("n", "m"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    try:
        ns = [int(x) for x in args.cost_ns.split(",")] if args.cost_ns else []
    except ValueError:
        raise ConfigError(f"--cost-ns: expected comma-separated integers, got {args.cost_ns!r}") from None
    suite = load_settings(args.suite)
    overrides = dict(parse_override(o) for o in args.overrides)
    if overrides:
        suite = {**suite, "overrides": {**(suite.get("overrides") or {}), **overrides}}
    try:  # a smaller grid where runs are expensive (a causal LM on CPU): one rate, no budget ladder
        if args.lr_grid:
            suite = {**suite, "lr_grid": {**(suite.get("lr_grid") or {}), "lora": [float(x) for x in args.lr_grid.split(",")]}}
        if args.budgets:
            suite = {**suite, "budgets": [float(x) for x in args.budgets.split(",")]}
    except ValueError:
        raise ConfigError(f"--lr-grid/--budgets: expected comma-separated numbers, got {args.lr_grid or args.budgets!r}") from None
    tasks = parse_tasks(args.tasks) if args.tasks else discover_tasks(args.data_dir, suite.get("prefer"))
    chosen = [t for family in tasks.values() for t in family] if args.tasks else (tasks.get("glue") or [])[:1]
    if not chosen:
        raise ConfigError("--tasks: bench plan needs a task (no GLUE task found in the data folder)")
    if any(t.startswith("commonsense/") for t in chosen) and not args.label_words:
        raise ConfigError("--label-words: commonsense tasks are planned through their label words, e.g. "
                          "--label-words false,true")
    report, log = open_output(args.out, args.report, "PLAN.md", "bench_plan.log")
    t0 = time.time()
    ctx = Context(suite, tasks, [args.seed], args.data_dir, args.out, log)
    cands = parse_candidates(args.kinds, args.lambdas)
    if REFERENCE not in cands:
        raise ConfigError(f"--kinds/--lambdas: the grid must hold the reference candidate {REFERENCE.name!r}")
    results = [bench_task(ctx, t, args.out, args.n, args.m, args.sketch_dim, cands, log, args.label_words,
                          args.sketch) for t in chosen]
    cost = []
    if ns:
        cost_task = next((t for t in chosen if t.startswith("glue/")), None) or \
            next(iter(discover_tasks(args.data_dir, suite.get("prefer")).get("glue") or []), None)
        if cost_task is None:
            raise ConfigError("--cost-ns: times the kernel of a GLUE task's classifier; none found")
        claim = Claim(id="cost", title="", tasks=[], arms={"lora": {}}, base={"method": "lora", "rank": 8, "alpha": 16})
        settings = run_settings(suite, claim, cost_task, "lora", args.seed, args.data_dir)
        for model in args.cost_models.split(",") if args.cost_models else [settings["model"]]:
            # another model is read through its own sequence-classification head (mean pooling is BERT-only)
            own = settings if model == settings["model"] else {**settings, "model": model, "pooling": "cls"}
            cost += cost_rows(own, ns, args.m, args.sketch_dim, args.out, log, args.sketch)
    command = command_line("qkvtune bench plan …")
    write_report(results, cost, report, command, time.time() - t0)
    for r in results:
        print(f"{r['task']}: spearman {r['spearman']:.3f}, pick − grid best {r['pick_minus_grid_best']:+.4f}, "
              f"compute ×{r['compute_ratio']:.1f}")
    print(f"report: {report}")
    return 0


def register(sub) -> None:
    from .suite import default_suite_dir

    p = sub.add_parser("plan", help="qkvtune plan's predictions against a real grid trained with fair rates")
    p.add_argument("--suite", default=default_suite_dir(), help="the claims suite whose settings and lr grid the "
                   "real grid uses (default: configs/claims)")
    p.add_argument("--data-dir", help="folder laid out like shared/datasets")
    p.add_argument("--tasks", help="task ids, glue/<task> or commonsense/<name> (default: the first GLUE task "
                   "found)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=256, help="training examples in the plan's kernel")
    p.add_argument("--m", type=int, default=128, help="validation examples the plan scores on")
    p.add_argument("--sketch-dim", type=int)
    p.add_argument("--sketch", choices=("kron", "srht"), default="kron", help="as for qkvtune plan")
    add_candidate_options(p)
    p.add_argument("--lr-grid", help="the LoRA rates each candidate searches (default: the suite's lora grid)")
    p.add_argument("--budgets", help="the budget ladder (default: the suite's), e.g. 1 for none")
    p.add_argument("--cost-ns", help="also time the kernel against one LoRA epoch at these n, e.g. 256,1024,4096")
    p.add_argument("--cost-models", help="the models timed (default: the GLUE family's), e.g. minilm,smollm2-135m")
    p.add_argument("--label-words", help="for commonsense tasks: the label words the plan reads, e.g. false,true")
    p.add_argument("overrides", nargs="*", help="key=value for every run, or family.key=value for one family, "
                   "as for bench claims")
    p.add_argument("--out", default="runs/bench-plan", help="folder for the runs, plans and the report")
    p.add_argument("--report", help="Markdown report path (default: OUT/PLAN.md); a JSON beside it")
    p.set_defaults(func=cmd_plan)
