"""``qkvtune bench plan``, the command and its report (PLAN.md beside PLAN.json, a plot per task): what
``plan_grid`` measured, each target met or not."""

from __future__ import annotations

import math
import os
import time

from ..config import ConfigError
from ..data.families import task_kind
from ..plan import REFERENCE, add_candidate_options, parse_candidates, parse_numbers
from ..task import CAUSAL_LM, QA_GENERATION
from .plan_grid import (LM_SIZE, PLAN_CLAIM_BASE, bench_task, check_budget, cost_rows, grid_rates, lm_gate,
                        plan_claim, real_grid)
from .suite import parse_tasks

# --- the report --------------------------------------------------------------------------------------------------

def _ok(b) -> str:
    return "met" if b else "**not met**"


def task_lines(r: dict, out_dir: str) -> list[str]:
    lm = r["metric"] == "loss"
    p = r["plan"]
    ts = p["time_scale"]
    lines = [f"## {r['task']}", "",
             f"Gate: {r['gate'][1]} (budget ×{r['budget']:g}); seeds {r['seeds']}; rates {r['rates']}; the plan at "
             f"the reference's searched rate {r['reference_lr']:g}, {p['n_train']} + {p['n_val']} kernel points "
             f"({p['readout']}); time scale s = {ts['scale']:.3g}, growth κ = {ts['growth']:.3g}.", "",
             r["verdict"], "", "| | measured | target |", "|---|---|---|"]
    rel_ok = r["reliability_searched"] >= 0.5
    lines += [f"| Spearman(predicted, real) over the full grid ({r['points']} points: candidates × rates; real = mean of "
              f"{len(r['seeds'])} seeds) | {r['spearman_full']:.3f} (reliability {r['reliability_full']:.2f}) | ≥ 0.7: "
              f"{_ok(r['spearman_full'] >= 0.7)} |",
              f"| Spearman over candidates each at its best rate (real: the grid's; predicted: the plan's) | "
              f"{r['spearman_searched']:.3f} (reliability {r['reliability_searched']:.2f}) | ≥ 0.6 where reliability ≥ "
              f"0.5: " + (_ok(r["spearman_searched"] >= 0.6) if rel_ok else "not rankable (reliability < 0.5)") + " |"]
    div = r["diverged"]
    caught = all(d["predicted_unstable"] for d in div)
    lines += [f"| real runs that diverged, predicted unstable | {sum(d['predicted_unstable'] for d in div)} of "
              f"{len(div)}" + (": " + ", ".join(f"{d['candidate']} lr={d['lr']:g} ({d['edge_ratio']:.2f} of the edge)"
                                              for d in div) if div else "") + f" | all: {_ok(caught)} |",
              f"| the real best ({r['grid_best']['candidate']} lr={r['grid_best']['lr']:g}) predicted unstable | "
              f"{'yes' if r['unstable_best'] else 'no'} | no: {_ok(not r['unstable_best'])} |"]
    pk, gb = r["pick"], r["grid_best_seed"]
    if lm:
        lines.append(f"| pick ({pk['name']}, {pk['max_steps']} steps) validation loss against the grid's best "
                     f"({gb['candidate']} lr={gb['lr']:g}), seed {r['seeds'][0]} | {pk['value']:.4f} vs {gb['value']:.4f}: "
                     f"{100 * r['pick_gap']:+.2f} % | ≤ +2 %: {_ok(r['pick_gap'] <= 0.02)} |")
    else:
        lines.append(f"| pick ({pk['name']}, {pk['max_steps']} steps) test score − the grid's best by validation "
                     f"({gb['candidate']} lr={gb['lr']:g}), seed {r['seeds'][0]} | {pk['value']:.4f} − {gb['value']:.4f} "
                     f"= {r['pick_gap']:+.4f} | ≥ −0.01: {_ok(r['pick_gap'] >= -0.01)} |")
    lines += [f"| compute: one seed of the grid {r['grid_seconds_one_seed'] / 60:.1f} min / (plan "
              f"{r['plan_seconds']:.0f} s + its run {pk['seconds']:.0f} s) | {r['compute_ratio']:.1f}× (the whole "
              f"{len(r['seeds'])}-seed grid: {r['compute_ratio_all']:.1f}×) | ≥ 10×: {_ok(r['compute_ratio'] >= 10)} |",
              f"| compute in runs: one seed of the grid is {r['grid_runs_one_seed']} runs; the plan cost "
              f"{r['plan_in_runs']:.2f} of its pick's run, timed back to back | {r['compute_ratio_runs']:.1f}× | ≥ 10×: "
              f"{_ok(r['compute_ratio_runs'] >= 10)} |",
              "", "Spearman at one rate for all: " + ", ".join(f"{b['lr']:g}: {b['spearman']:.3f}" for b in r["by_rate"])
              + ".", ""]
    if r.get("groups_real"):
        g = r["groups_real"]
        lines += ["Attention only vs MLP only vs all-linear (each group's best grid point; validation loss, mean "
                  "of the seeds; 95 % paired bootstrap over validation examples of the difference from the best):", "",
                  "| group | best point | real validation loss (seeds) | − best [95 % interval] | predicted (plan) |",
                  "|---|---|---|---|---|"]
        for name in ("attention only", "MLP only", "all-linear"):
            if name in g:
                x = g[name]
                pred = p["groups"].get(name, {})
                lines.append(f"| {name} | {x['point']} | {x['loss']:.4f} ({', '.join(f'{v:.4f}' for v in x['seeds'])}) "
                             f"| {x['minus_best']:+.4f} [{x['interval'][0]:+.4f}, {x['interval'][1]:+.4f}] | "
                             f"{pred.get('score', math.nan):.4f} ({pred.get('best', '–')}) |")
        lines.append("")
    metric = "validation loss" if lm else f"validation {r['metric']}"
    lines += [f"| candidate | lr | predicted {metric} | simulated (stability aside) | η·λ_max / edge | real (seeds) "
              f"| diverged | real test (seeds) |", "|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        lines.append(f"| {x['candidate']} | {x['lr']:g} | {x['predicted']:.4f}{' (unstable)' if x['unstable'] else ''} | "
                     f"{x['simulated']:.4f} | {x['edge_ratio']:.2f} | {x['real']:.4f} "
                     f"({', '.join(f'{v:.3f}' for v in x['seeds'])}) | {'yes' if any(x['diverged']) else ''} | "
                     f"{', '.join(f'{v:.3f}' for v in x['tests'])} |")
    png = r.get("png")
    lines += ["", f"The plan itself: `{r['plan_dir']}/plan.md`." + (f" ![predicted against real]({png})" if png else ""),
              ""]
    return lines


def plot_task(r: dict, path: str) -> bool:
    from ..analysis.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for lr in r["rates"]:
        pts = [x for x in r["rows"] if x["lr"] == lr]
        ax.scatter([x["predicted"] for x in pts], [x["real"] for x in pts], label=f"lr {lr:g}", s=18)
    ax.set_xlabel("predicted (unstable: the constant predictor)")
    ax.set_ylabel(f"real (mean of {len(r['seeds'])} seeds)")
    ax.set_title(f"{r['task']}: {r['metric']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(results: list[dict], checks: list[dict], cost: list[dict], path: str, command: str,
                 seconds: float, cpu: float, preface: str | None = None) -> None:
    from ..analysis.plots import plot_lines
    from ..files import write_json
    from .report import machine

    out_dir = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.abspath(path))[0]
    for r in results:
        png = f"{stem}_{r['task'].replace('/', '-').replace('.', '_')}.png"
        if plot_task(r, png):
            r["png"] = os.path.relpath(png, out_dir)
    lines = ["# qkvtune plan v2 against a real grid", "",
             f"- command: `{command}`", f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; this invocation {seconds / 60:.1f} min wall, "
             f"{cpu / 60:.1f} min CPU (runs already in the run folder are read, not retrained; their own seconds are "
             f"in the tables)", ""]
    if preface:
        lines += [preface, ""]
    for r in results:
        lines += task_lines(r, out_dir)
    for c in checks:
        b = c["budget"]
        lines += [f"## Budget check: {c['task']} at ×1", "",
                  f"The reference at the configured budget: {c['configured_gate'][1]} "
                  f"({'passed' if c['configured_gate'][0] else 'missed'}). The plan's goal: validation "
                  f"{c['goal_metric']} {c['goal']:.3g}.", ""]
        if b.get("found") == "configured":
            lines += ["The plan predicts a candidate reaching the goal within the configured budget: nothing to extend.",
                      ""]
        elif b.get("found") in ("steps", "examples"):
            lines += [f"The plan: {b['found']} ×{b.get('factor') or b.get('examples_factor'):.3g}; one real run of the "
                      f"reference at {c['check_settings']} (lr {c['check_lr']:g}): {c['check_gate'][1]} — "
                      f"{'passed' if c['check_gate'][0] else 'missed'} ({c['check_seconds']:.0f} s).", ""]
        else:
            lines += [f"The plan: no budget up to ×{b.get('cap')} reaches the goal.", ""]
    if cost:
        lines += ["## Cost of a plan's kernel against one LoRA epoch", "",
                  "Measured one after the other in one process: the eNTK of every linear kind of every layer and the "
                  "head on n training + m validation examples (sketched where the gradients would pass 6 GiB) against "
                  "one epoch of LoRA (r = 8, q and v) over the same n training examples: Trainer's training loop, "
                  "without loading the model or the final evaluations (the whole run's wall time beside it).", "",
                  "| model | n (+ m validation) | kinds | sketch | kernel | one LoRA epoch over n (whole run) | "
                  "kernel / epoch |", "|---|---|---|---|---|---|---|"]
        for c in cost:
            sk = f"{c['sketch']} {c['sketch_dim']}" if c["sketch_dim"] else "none"
            lines.append(f"| {c['model']} | {c['n']} (+{c['m']}) | {', '.join(c['kinds'])} + head | {sk} | "
                         f"{c['kernel_seconds']:.1f} s | {c['lora_epoch_seconds']:.1f} s ({c['lora_run_wall_seconds']:.1f} s)"
                         f" | {c['ratio']:.2f} |")
        png = stem + "_cost.png"
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
    write_json(stem + ".json", {"tasks": results, "budget_checks": checks, "cost": cost})


# --- the command -------------------------------------------------------------------------------------------------

def parse_bench_tasks(spec: str) -> list[str]:
    return [t for ts in parse_tasks(spec).values() for t in ts]


def cmd_plan(args) -> int:
    from ..config import parse_override
    from .report import command_line
    from .runner import Runner, open_output, run_settings
    from .suite import Claim, discover_tasks, load_settings

    for name in ("n", "m", "tokens"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name}: must be >= 1, got {getattr(args, name)}")
    try:
        ns = [int(x) for x in args.cost_ns.split(",")] if args.cost_ns else []
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--cost-ns/--seeds: expected comma-separated integers, got {args.cost_ns or args.seeds!r}") \
            from None
    suite = load_settings(args.suite)
    families = suite.get("families") or {}
    suite = {**suite, "families": {**families, "sft": {**(families.get("sft") or {}), **LM_SIZE}}}
    overrides = dict(parse_override(o) for o in args.overrides)
    if overrides:
        suite = {**suite, "overrides": {**(suite.get("overrides") or {}), **overrides}}
    grid = parse_numbers(args.lr_grid, "--lr-grid")
    if grid:
        suite = {**suite, "lr_grid": {**(suite.get("lr_grid") or {}), "lora": grid}}
    budgets = parse_numbers(args.budgets, "--budgets")
    if budgets:
        suite = {**suite, "budgets": budgets}
    checks_for = parse_bench_tasks(args.check_budget) if args.check_budget else []
    if args.tasks:
        chosen = parse_bench_tasks(args.tasks)
    elif checks_for:  # a budget check alone trains no grid
        chosen = []
    else:
        chosen = (discover_tasks(args.data_dir, suite.get("prefer")).get("glue") or [])[:1]
        if not chosen:
            raise ConfigError("--tasks: bench plan needs a task (no GLUE task found in the data folder)")
    if any(task_kind(t) == QA_GENERATION for t in chosen) and not args.label_words:
        raise ConfigError("--label-words: commonsense tasks are planned through their label words, e.g. "
                          "--label-words false,true")
    if any(task_kind(t) == CAUSAL_LM for t in checks_for):
        raise ConfigError("--check-budget: checks a budget by the suite's gate on a GLUE or commonsense task, "
                          "not an sft file")
    cands = parse_candidates(args.kinds, args.lambdas)
    grid_cands = parse_candidates(args.grid_kinds or args.kinds, args.grid_lambdas or args.lambdas) \
        if (args.grid_kinds or args.grid_lambdas) else cands
    if REFERENCE not in grid_cands or REFERENCE not in cands:
        raise ConfigError(f"--kinds/--lambdas: the grid must hold the reference candidate {REFERENCE.name!r}")
    if not set(grid_cands) <= set(cands):
        raise ConfigError("--grid-kinds/--grid-lambdas: the real grid's candidates must be among the plan's")
    report, log = open_output(args.out, args.report, "PLAN.md", "bench_plan.log")
    t0, c0 = time.time(), time.process_time()
    tasks = {}
    for t in chosen + checks_for:
        tasks.setdefault(t.split("/")[0], []).append(t)
    ctx = Runner(suite, tasks, seeds, args.data_dir, args.out, log)
    lm_ctx = Runner({**suite, "budgets": [1]}, tasks, seeds, args.data_dir, args.out, log)  # no ladder for a loss
    results, checks = [], []
    for t in chosen:
        c = lm_ctx if task_kind(t) == CAUSAL_LM else ctx
        if args.grid_only:
            claim = plan_claim(grid_cands)
            base = None
            if task_kind(t) == CAUSAL_LM:
                base = lm_gate(c, claim, t, log)[1]
            else:
                c.reference(claim, t, claim.ref)
            real_grid(c, claim, t, grid_cands, grid_rates(c, claim, t), log, base)
            continue
        results.append(bench_task(c, t, args.out, args.n, args.m, args.sketch_dim, cands, grid_cands, log,
                                  args.label_words, args.sketch, args.tokens))
    for t in checks_for if not args.grid_only else []:
        checks.append(check_budget(ctx, t, args.out, args.n, args.m, args.sketch_dim, cands, log, args.sketch,
                                   args.tokens))
    cost = []
    if ns and not args.grid_only:
        cost_task = next((t for t in chosen if t.startswith("glue/")), None) or \
            next(iter(discover_tasks(args.data_dir, suite.get("prefer")).get("glue") or []), None)
        if cost_task is None:
            raise ConfigError("--cost-ns: times the kernel of a GLUE task's classifier; none found")
        claim = Claim(id="cost", title="", tasks=[], arms={"lora": {}}, base=dict(PLAN_CLAIM_BASE))
        settings = run_settings(suite, claim, cost_task, "lora", seeds[0], args.data_dir)
        for model in args.cost_models.split(",") if args.cost_models else [settings["model"]]:
            # another model is read through its own sequence-classification head (mean pooling is BERT-only)
            own = settings if model == settings["model"] else {**settings, "model": model, "pooling": "cls"}
            cost += cost_rows(own, ns, args.m, args.sketch_dim, args.out, log, args.sketch)
    if args.grid_only:
        print(f"grid: {args.out}/runs")
        return 0
    preface = open(args.preface, encoding="utf-8").read().strip() if args.preface else None
    write_report(results, checks, cost, report, command_line("qkvtune bench plan …"), time.time() - t0,
                 time.process_time() - c0, preface)
    for r in results:
        print(f"{r['task']}: spearman full grid {r['spearman_full']:.3f} (reliability {r['reliability_full']:.2f}), "
              f"pick gap {r['pick_gap']:+.4f}, compute ×{r['compute_ratio']:.1f}")
    print(f"report: {report}")
    return 0


def register(sub) -> None:
    from .suite import default_suite_dir

    p = sub.add_parser("plan", help="qkvtune plan's predictions against a real grid (candidates × rates × seeds)")
    p.add_argument("--suite", default=default_suite_dir(), help="the claims suite whose settings, lr grid, gate and "
                   "budget ladder the real grid uses (default: configs/claims)")
    p.add_argument("--data-dir", help="folder laid out like shared/datasets")
    p.add_argument("--tasks", help="task ids: glue/<task>, commonsense/<name>, sft/<file under text/> (judged by "
                   "validation loss) (default: the first GLUE task found, unless --check-budget is given alone)")
    p.add_argument("--seeds", default="0,1", help="seeds of the real grid (two or more: its reliability is measured)")
    p.add_argument("--n", type=int, default=1024, help="training points in the plan's kernel")
    p.add_argument("--m", type=int, default=128, help="validation points the plan scores on")
    p.add_argument("--tokens", type=int, default=4, help="language-model tasks: trained tokens per example")
    p.add_argument("--sketch-dim", type=int)
    p.add_argument("--sketch", choices=("kron", "srht"), default="kron", help="as for qkvtune plan")
    add_candidate_options(p)
    p.add_argument("--grid-kinds", help="the real grid's target sets, when only some of the plan's are trained")
    p.add_argument("--grid-lambdas", help="the real grid's λ values, when only some of the plan's are trained")
    p.add_argument("--lr-grid", help="the LoRA rates (default: the suite's lora grid)")
    p.add_argument("--budgets", help="the budget ladder (default: the suite's), e.g. 1 for none")
    p.add_argument("--check-budget", help="tasks to plan at their first budget and check the budget the plan names "
                   "with one real run, e.g. glue/stsb")
    p.add_argument("--grid-only", action="store_true", help="train the real grid (cached) and stop")
    p.add_argument("--cost-ns", help="also time the kernel against one LoRA epoch at these n, e.g. 256,1024,4096")
    p.add_argument("--cost-models", help="the models timed (default: the GLUE family's), e.g. minilm,smollm2-135m")
    p.add_argument("--label-words", help="for commonsense tasks: the label words the plan reads, e.g. false,true")
    p.add_argument("--preface", help="a Markdown file put at the top of the report")
    p.add_argument("overrides", nargs="*", help="key=value for every run, or family.key=value for one family "
                   "(glue., commonsense., sft.), as for bench claims")
    p.add_argument("--out", default="runs/bench-plan", help="folder for the runs, plans and the report")
    p.add_argument("--report", help="Markdown report path (default: OUT/PLAN.md); a JSON beside it")
    p.set_defaults(func=cmd_plan)
