"""The claims report: Markdown with the command, machine, date, wall and CPU time and the learning-rate search's
cost on top, a verdict table with each claim's parts and the resolution it had, a "testable here?" table, one
section per claim (the gate per task and the head's rate, each arm's chosen rate and validation curve over the
grid with its flags — rate at the search's bound, tie broken, still rising at the step cap, not learned, adapter
not learned or gain unresolved on the validation split — test scores per arm and task as mean ± sd over seeds beside the same runs with ΔW removed,
quantities, each check with its interval, verdict and power, the papers' own words and numbers with the row they
come from, and for a claim that sets two sources against each other which one the evidence supports) and PNG
plots beside it; ``claims.json`` holds every figure."""

from __future__ import annotations

import glob
import json
import math
import os
import platform
import statistics
import time

import torch

from ..analysis.plots import pyplot, save_figure
from . import verdicts
from .scores import score_key


def _fmt(values) -> str:
    xs = [v for v in values if v is not None and isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.4g}"
    return f"{statistics.mean(xs):.4g} ± {statistics.stdev(xs):.2g}"


def command_line(default: str) -> str:
    """The command as the user typed it (``qkvtune …`` or ``python -m qkvtune …``), else ``default``."""
    import sys

    argv0 = sys.argv[0] if sys.argv else ""
    if argv0.endswith("qkvtune") or argv0.endswith(os.path.join("qkvtune", "__main__.py")):
        return "qkvtune " + " ".join(sys.argv[1:])
    return default


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU only, {torch.get_num_threads()} threads"
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), {dev}; Python {platform.python_version()}, torch {torch.__version__}"


def cpu_minutes() -> float:
    """User + system CPU time of this process and its finished children, in minutes."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime) / 60


def _setting(run, key: str):
    with open(os.path.join(run.dir, "claims_run.json")) as f:
        return json.load(f)["settings"].get(key)


def _plot_scores(result, path: str) -> bool:
    plt = pyplot()

    arms = [a for a in result.claim.arms if any(f"score:{a}@{t}" in result.quantities for t in result.tasks)]
    if not arms:
        return False
    fig, axes = plt.subplots(1, len(result.tasks), figsize=(3.2 * len(result.tasks) + 1, 3.2), squeeze=False)
    for ax, task in zip(axes[0], result.tasks):
        means, sds = [], []
        for a in arms:
            xs = [v for v in result.quantities.get(f"score:{a}@{task}", []) if math.isfinite(v)]
            means.append(statistics.mean(xs) if xs else 0.0)
            sds.append(statistics.stdev(xs) if len(xs) > 1 else 0.0)
        ax.bar(range(len(arms)), means, yerr=sds, capsize=3, color="#4878a8")
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(task, fontsize=9)
        lo = min(m - s for m, s in zip(means, sds))
        hi = max(m + s for m, s in zip(means, sds))
        pad = max(0.02, (hi - lo) * 0.3)
        ax.set_ylim(max(min(lo - pad, 1.0), -1.0), hi + pad)
    axes[0][0].set_ylabel("test score (mean ± sd over seeds)")
    fig.suptitle(f"{result.claim.id}: {result.claim.title}", fontsize=9)
    save_figure(fig, path)
    return True


def _plot_curves(result, path: str) -> bool:
    """Validation score against step for every arm with an evaluation history (mean over seeds), per task."""
    series = {}
    for seed_runs in result.runs.values():
        for task, by_arm in seed_runs.items():
            key = score_key(task)
            for arm, run in by_arm.items():
                pts = [(h["step"], h[key]) for h in run.history if key in h]
                if len(pts) >= 3:
                    series.setdefault((task, arm), []).append(dict(pts))
    if not series:
        return False
    tasks = sorted({t for t, _ in series})

    def draw(ax, task):
        for (t, arm), curves in sorted(series.items()):
            if t == task:
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], "o-", ms=3, label=arm)

    _per_task(tasks, draw, "step", f"{result.claim.id}: validation score during training (mean over seeds)", path)
    return True


def _per_task(tasks, draw, xlabel: str, title: str, path: str, log_x: bool = False) -> None:
    """One panel per task (the task's validation metric on y), ``draw(ax, task)`` filling each."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        draw(ax, task)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation " + score_key(task)[5:])
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def _plot_loss_curves(result, path: str) -> bool:
    """C7-style: dev loss against step per seed, with the predicted stopping step marked."""
    plt = pyplot()

    preds = result.quantities.get("predicted_step")
    if not preds:
        return False
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, (seed, seed_runs) in enumerate(result.runs.items()):
        for task, by_arm in seed_runs.items():
            for arm, run in by_arm.items():
                pts = [(h["step"], h["eval_loss"]) for h in run.history if "eval_loss" in h]
                if len(pts) >= 3 and arm in [m.get("arm") for m in result.claim.measures]:
                    line, = ax.plot(*zip(*pts), "o-", ms=3, label=f"seed {seed}")
                    if i < len(preds) and math.isfinite(preds[i]):
                        ax.axvline(preds[i], color=line.get_color(), ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title(f"{result.claim.id}: validation loss; dashed: the rule's T̂", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _plot_grid(result, path: str) -> bool:
    """Validation score over each arm's learning-rate grid (first seed), one panel per task."""
    panels = {t: {a: r.grid for a, r in arms.items() if r.grid} for t, arms in result.arms.items()}
    panels = {t: a for t, a in panels.items() if a}
    if not panels:
        return False

    def draw(ax, task):
        for arm, grid in panels[task].items():
            ax.plot([g[0] for g in grid], [g[1] for g in grid], "o-", ms=4, label=arm)

    _per_task(list(panels), draw, "learning rate (η_Q)", f"{result.claim.id}: learning-rate search (first seed)",
              path, log_x=True)
    return True


def quote_text(paper) -> str:
    """A claim's ``paper:``: a line of text, or quotes — {table, row, cells} (a row of a table in the transcription
    ``papers.md``, its cells as printed there) or {text, source} (words quoted verbatim)."""
    if not paper:
        return "–"
    if isinstance(paper, str):
        return paper.strip()
    out = []
    for q in paper:
        if "text" in q:
            out.append(f"{q.get('source', '')}: “{q['text']}”".strip(": "))
        else:
            cells = ", ".join(f"{k} {v}" for k, v in (q.get("cells") or {}).items())
            out.append(f"{q.get('table', '')}, row “{q['row']}”: {cells}".strip(", "))
    return "; ".join(out)


def resolution(r) -> float:
    """The median half-width of a claim's score comparisons' 90 % intervals (NaN if it has none)."""
    widths = [(c["interval"].high - c["interval"].low) / 2 for c in r.checks
              if str(c.get("a", "")).startswith("score:") and str(c.get("b", "")).startswith("score:")
              and math.isfinite(c["interval"].high - c["interval"].low)]
    return statistics.median(widths) if widths else math.nan


def _flags(r, task: str, arm: str, res) -> list[str]:
    flags = ["not learned"] if arm in r.not_learned.get(task, []) else []
    head = (r.head_only.get(task) or {}).get(arm)
    if head and head["status"] != "learned":
        flags.append(head["status"])
    if res.at_bound:
        flags.append(f"rate at the search's {res.at_bound} bound")
    for t in res.ties:
        flags.append(f"tie at {', '.join(f'{x:g}' for x in t['rates'])} broken by {t['decided_by']}")
    rising = (r.rising.get(task) or {}).get(arm) or []
    if rising:
        flags.append(f"still rising at the step cap in {len(rising)} of {len(res.runs)} seeds")
    return flags


def conclusion_lines(r) -> list[str]:
    """``conclusion: {above, below, parts}``: for each listed part (a comparison a − b), which side its interval
    supports: wholly above 0 ``above``, wholly below 0 ``below``, else neither."""
    spec = r.claim.conclusion or {}
    if not spec:
        return []
    lines = ["**Which source the evidence supports** (90 % t intervals of a − b; a loss as the gain b − a):", ""]
    for chk in r.checks:
        if chk["part"] not in (spec.get("parts") or [c["part"] for c in r.checks]):
            continue
        ci = chk["interval"]
        if not math.isfinite(ci.mean):
            side = f"not testable here ({chk.get('note', '')})"
        elif ci.low > 0:
            side = f"supports {spec['above']}"
        elif ci.high < 0:
            side = f"supports {spec['below']}"
        else:
            side = "supports neither: the interval holds 0"
        lines.append(f"- {chk['part']}: {ci} → {side}")
    return lines + [""]


def _rule_text(c: dict) -> str:
    if c["rule"] in verdicts.COMPARISONS:
        return f"{c['rule']}({c['a']}, {c.get('b', 0)}, margin {c.get('margin', 0)})"
    return f"{c['rule']}({c['a']}, {c['threshold']})"


def _pct(x) -> str:
    return "–" if x is None or not isinstance(x, (int, float)) or not math.isfinite(x) else f"{100 * x:.0f}%"


SPEED_INTRO = """Measured by `qkvtune bench speed` (one process per model and device, configurations interleaved round by
round, medians). × fwd: the step over one train-mode forward of the bare model; × floor: over k eval-mode forwards
(k = 1 inference, 2 adapter training: forward + input gradients, 3 full fine-tuning). merged-forward is the
merged and unwrapped model (what `qkvtune export` writes); merged-wrapped keeps qkvtune's wrappers. The `fast-`
rows use `fast_path: on` (CPU: cheap dropout masks; CUDA: `torch.compile`) against PEFT's eager step. Figures
are ratios measured side by side; run-to-run noise on these small, launch- or load-bound shapes is a few
percent, so a ratio within ±0.05 of its target is not a verdict either way."""


# what makes a check on a quantity fail in the unit tests: (quantity prefix, test), first match wins
FAILS_IN = (
    ("score:", "test_claims.py::test_rules_on_intervals, test_claims_measures.py::"
               "test_the_head_only_gate_reads_the_validation_split_and_says_when_it_cannot_decide"),
    ("steps:", "test_claims.py::test_rules_on_intervals"),
    ("phi_top1", "test_claims_measures.py::test_phi_on_B_fails_without_a_shared_direction_and_is_not_fooled_by_a_shared_A"),
    ("psi_bottom", "test_claims_measures.py::test_bottom_directions_check_fails_when_the_larger_adapter_holds_them"),
    ("dirs_over_random", "test_claims_measures.py::test_amplification_on_what_moved_can_fail_and_ignores_the_update_norm"),
    ("log_factor_over_random", "test_claims_measures.py::test_amplification_on_what_moved_can_fail_and_ignores_the_"
                               "update_norm (it is −log dirs_over_random: test_claims.py end to end)"),
    ("regret_at_prediction", "test_claims_measures.py::test_the_stopping_check_reads_only_seeds_whose_loss_turned"),
)


def reviewer_lines(results) -> list[str]:
    """Per part: the unit test in which a check of its kind fails (none: said), and what would resolve it — decided,
    the seeds for 80 % power at this test set, and at the paper's effect where the claim states one (``effect``)."""
    lines = ["### For a reviewer: could each check fail, and what would resolve it", "",
             "The unit test (under `tests/`) that builds inputs on which a check of this kind does not hold; then "
             "what the part needs: nothing (decided), the seeds for 80 % power at this test set and margin, or — "
             "where no number of seeds reaches it — a larger test set or budget (the papers' scale: a GPU, "
             "`--device cuda` with the papers' models and full data).", "",
             "| claim | part | verdict | could it fail? (unit test) | to resolve |", "|---|---|---|---|---|"]
    for r in results:
        for c in r.checks:
            names = [str(c.get(s, "")) for s in ("a", "b") if c.get(s) is not None]
            test = next((t for p, t in FAILS_IN if any(n.startswith(p) for n in names)), None)
            if c["verdict"] in (verdicts.HOLDS, verdicts.FAILS):
                need = "decided"
            elif c["verdict"] in verdicts.UNREAD:
                need = f"testable first: {c.get('note') or 'the gate'}"
            elif c.get("seeds_needed"):
                need = f"{c['seeds_needed']} seeds"
            elif c["rule"] in verdicts.COMPARISONS and math.isfinite(c["interval"].se):
                need = f"> 50 seeds at this test set (±{(c['interval'].high - c['interval'].low) / 2:.3g} against a " \
                       f"margin of {c.get('margin', 0)}): a larger test set or budget"
            else:
                need = "more seeds (one value per seed; no power figure for this rule)"
            if "effect" in c:
                need += f"; at the paper's effect ({c['effect']}): " + \
                    (f"{c['effect_seeds']} seeds" if c.get("effect_seeds") else "> 50 seeds here")
            lines.append(f"| {r.claim.id} | {c['part']} | {c['verdict']} | "
                         f"{test or '**no unit test makes it fail**'} | {need} |")
    return lines + [""]


def speed_section(folder: str | None) -> list[str]:
    """The tables of every speed_*.json in ``folder`` (written by ``qkvtune bench speed``)."""
    from .speed import table

    paths = sorted(glob.glob(os.path.join(folder, "speed_*.json"))) if folder and os.path.isdir(folder) else []
    if not paths:
        return []
    lines = ["## Speed and memory against PEFT", "", SPEED_INTRO, ""]
    for p in paths:
        with open(p) as f:
            rep = json.load(f)
        lines += [table(rep).replace("## ", "### ", 1), "",
                  f"`{os.path.relpath(p)}`; {rep.get('date', '')}, {rep.get('device_name') or rep.get('device')}; "
                  f"torch {(rep.get('versions') or {}).get('torch', '?')}", ""]
    return lines


def search_minutes(results) -> float:
    """Minutes of the rate searches' other runs (and budgets not kept), each search once: claims that share a
    task's reference arm share its runs (an untestable task's ladder appeared in every claim on it)."""
    searches = {}
    for r in results:
        for task, arms in r.arms.items():
            for arm, a in arms.items():
                if a.grid:
                    key = tuple(sorted(x.dir for x in a.grid_runs.values())) or (task, json.dumps(sorted(a.grid)), arm)
                    searches[key] = a.search_seconds
    return sum(searches.values()) / 60


def write_report(results, path: str, command: str, seconds: float, speed_dir: str | None = None,
                 preface: str | None = None) -> None:
    out_dir = os.path.dirname(os.path.abspath(path))
    plots = os.path.join(out_dir, "claims_plots")
    os.makedirs(plots, exist_ok=True)
    unique = {run.dir: run for r in results for t in r.arms.values() for a in t.values() for run in a.runs.values()}
    search_min = search_minutes(results)
    cpu = cpu_minutes()
    lines = ["# qkvtune claims report", "",
             f"- command: `{command}`",
             f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; wall time of this invocation {seconds / 60:.1f} min, "
             f"CPU time {cpu:.1f} min (user + system, this process and its children; runs already in the run folder "
             "are read, not retrained)",
             f"- {len(unique)} training runs at the chosen rates, {sum(r.seconds for r in unique.values()) / 60:.1f} min "
             f"of training (as timed when each was trained); the learning-rate search's other runs: "
             f"{search_min:.1f} min more; the head-only scoring, analyses and kernels come on top", "",
             "Splits: each run's validation split is carved from its training data with its seed (`val_size`); "
             "learning rate, checkpoint and early stopping read only that. Every score in the tables below is on "
             "the task's dev/test file (the test split), which nothing selects on.", ""]
    if preface:
        lines += [preface.strip(), ""]
    lines += ["## Verdicts", "",
              "| claim | verdict | parts | tasks (testable) | seeds | resolution (median 90 % half-width of its score "
              "comparisons) | the papers' own words and numbers |", "|---|---|---|---|---|---|---|"]
    for r in results:
        v = r.verdict + (f" ({r.skipped})" if r.skipped else "")
        parts = "; ".join(f"{c['part']}: {c['verdict']}" for c in r.checks) or "–"
        tasks = ", ".join(t + ("" if t in r.testable else " (not testable)") for t in r.tasks) or "–"
        res = resolution(r)
        lines.append(f"| {r.claim.id}: {r.claim.title} | **{v}** | {parts} | {tasks} | {len(r.seeds)} | "
                     f"{'–' if not math.isfinite(res) else f'±{res:.3g}'} | {quote_text(r.claim.paper)} |")
    lines += ["", "### Testable here?", "",
              "Per claim: the parts decided (holds or does not hold) out of those that could be read, the parts "
              "that could not (and why), and for the undecided comparisons the seeds that 80 % power would take "
              "at this test set (– where no number of seeds reaches it: the test set's own noise is too large "
              "against the margin).", "",
              "| claim | decided / readable parts | not testable here | seeds for 80 % power (undecided comparisons) |",
              "|---|---|---|---|"]
    for r in results:
        readable = [c for c in r.checks if c["verdict"] not in verdicts.UNREAD]
        decided = [c for c in readable if c["verdict"] in (verdicts.HOLDS, verdicts.FAILS)]
        missing = "; ".join(f"{c['part']} ({c.get('note', '')})" for c in r.checks
                            if c["verdict"] in verdicts.UNREAD) or (r.skipped or "–")
        need = ", ".join(f"{c['part']}: {c.get('seeds_needed') or '–'}" for c in readable
                         if c["verdict"] == verdicts.UNSURE and c["rule"] in verdicts.COMPARISONS) or "–"
        lines.append(f"| {r.claim.id} | {len(decided)} / {len(readable)} | {missing} | {need} |")
    lines += [""] + reviewer_lines(results)
    lines += ["### The verdict rule", "", verdicts.__doc__.split("\n\n", 1)[1].strip(), ""]
    lines += speed_section(speed_dir)
    record = []
    for r in results:
        c = r.claim
        lines += [f"## {c.id}: {c.title}", "", f"Source: {c.source}. Config: `{os.path.relpath(c.path)}`.", ""]
        if r.skipped:
            lines += [f"Skipped: {r.skipped}.", ""]
            record.append({"id": c.id, "verdict": r.verdict, "skipped": r.skipped, "tasks": r.tasks, "seeds": r.seeds})
            continue
        if c.notes:
            lines += [c.notes.strip(), ""]
        lines += ["| task | budget | gate (reference arm, validation) | head's rate | best constant predictor (test) |",
                  "|---|---|---|---|---|"]
        for t in r.tasks:
            ok, why = r.gates.get(t, (False, "not run"))
            const = r.constants.get(t)
            b = r.budgets.get(t)
            budget = "–" if not b else (f"×{b['factor']:g}: {b['max_train_samples'] or 'all'} examples, "
                                        f"≤ {b['max_steps']} steps, evaluated every {b['eval_steps']}")
            head = r.head_lr.get(t)
            lines.append(f"| {t} | {budget} | {'passed' if ok else '**not testable at this budget**'}: {why} | "
                         f"{'–' if head is None else f'{head:g}'} | "
                         f"{'–' if const is None or not math.isfinite(const) else f'{const:.4g}'} |")
        lines.append("")
        lines += ["| arm | task | settings | η_Q chosen | validation over the search (first seed) | test score | "
                  "same runs, ΔW removed: test score (validation gain, 90 % t) | |", "|---|---|---|---|---|---|---|---|"]
        for t, arms in r.arms.items():
            for a, res in arms.items():
                settings = ", ".join(f"{k}={v}" for k, v in (c.arms[a] or {}).items())
                if (c.arms[a] or {}).get("params_from") and res.runs:
                    run0 = next(iter(res.runs.values()))
                    settings += f" → rank {_setting(run0, 'rank')}, α {_setting(run0, 'alpha')}"
                grid = ", ".join(f"{lr:g}: {v:.3f}" for lr, v in res.grid) or \
                    ("borrowed from " + str((c.arms[a] or {}).get("lr_from")) if (c.arms[a] or {}).get("lr_from")
                     else "fixed")
                head = (r.head_only.get(t) or {}).get(a)
                without = "–" if not head else f"{head['score']:.4g} ({head['interval']})"
                lr = "–" if res.lr is None else f"{res.lr:g}"
                lines.append(f"| {a} | {t} | {settings} | {lr} | {grid} | "
                             f"{_fmt([x.score for x in res.runs.values()])} | {without} | "
                             f"{'; '.join(_flags(r, t, a, res))} |")
        lines.append("")
        extra = [k for k in r.quantities if not k.startswith("score:") and "@" not in k]
        if extra:
            lines += ["| quantity | mean ± sd | per seed |", "|---|---|---|"]
            for k in extra:
                per_seed = ", ".join(f"{v:.4g}" for v in r.quantities[k])
                lines.append(f"| {k} | {_fmt(r.quantities[k])} | {per_seed} |")
            lines.append("")
        lines += ["| part | check | 90% interval | verdict | power | seeds for 80% power | note |",
                  "|---|---|---|---|---|---|---|"]
        for chk in r.checks:
            ci = chk["interval"]
            how = ci.how + (f", {ci.df:.1f} df" if math.isfinite(ci.df) else "")
            lines.append(f"| {chk['part']} | {_rule_text(chk)} | {ci} ({how}) | {chk['verdict']} | "
                         f"{_pct(chk.get('power'))} | {chk.get('seeds_needed') or '–'} | {chk.get('note', '')} |")
        lines += ["", f"**Verdict: {r.verdict}.** Paper: {quote_text(c.paper)}", ""]
        lines += conclusion_lines(r)
        for name, fn in (("scores", _plot_scores), ("curves", _plot_curves), ("grid", _plot_grid),
                         ("stopping", _plot_loss_curves)):
            png = os.path.join(plots, f"{c.id}_{name}.png")
            if fn(r, png):
                lines += [f"![{c.id} {name}]({os.path.relpath(png, out_dir)})", ""]
        minutes = sum(run.seconds for s in r.runs.values() for t in s.values() for run in t.values()) / 60
        lines += [f"Training time of this claim's runs: {minutes:.1f} min (shared runs counted in each claim).", ""]
        record.append({"id": c.id, "verdict": r.verdict, "tasks": r.tasks, "testable": r.testable, "seeds": r.seeds,
                       "gates": {t: list(g) for t, g in r.gates.items()}, "budgets": r.budgets,
                       "head_lr": r.head_lr, "constants": r.constants, "not_learned": r.not_learned,
                       "head_only": {t: {a: {"score": h["score"], "learned": h["learned"], "status": h["status"],
                                             "interval": vars(h["interval"])} for a, h in arms.items()}
                                     for t, arms in r.head_only.items()},
                       "rising": r.rising, "quantities": r.quantities,
                       "learning_rates": {t: {a: {"lr": x.lr, "grid": x.grid, "at_bound": x.at_bound, "ties": x.ties}
                                              for a, x in arms.items()} for t, arms in r.arms.items()},
                       "resolution": resolution(r),
                       "checks": [{**{k: v for k, v in chk.items() if k not in ("interval", "_task", "_found")},
                                   "interval": vars(chk["interval"])} for chk in r.checks]})
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "claims.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"),
                   "wall_minutes": seconds / 60, "cpu_minutes": cpu, "search_minutes": search_min, "claims": record},
                  f, indent=2, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x))
