"""The claims report: Markdown with the command, machine and date on top, a verdict table, one section per
claim (scores per arm and task as mean ± sd over seeds, derived quantities, each check with its interval and
verdict, the paper's own numbers) and PNG plots beside it; ``claims.json`` holds every figure."""

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


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    dev = f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"CPU only, {torch.get_num_threads()} threads"
    return f"{platform.system()} {platform.release()}, {os.cpu_count()} cores ({cpu}), {dev}; Python {platform.python_version()}, torch {torch.__version__}"


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
    axes[0][0].set_ylabel("dev score (mean ± sd over seeds)")
    fig.suptitle(f"{result.claim.id}: {result.claim.title}", fontsize=9)
    save_figure(fig, path)
    return True


def _plot_curves(result, path: str) -> bool:
    """Dev score against step for every arm with an evaluation history (mean over seeds), one panel per task."""
    plt = pyplot()


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
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for (t, arm), curves in sorted(series.items()):
            if t != task:
                continue
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            ax.plot(steps, [statistics.mean(c[s] for c in curves) for s in steps], "o-", ms=3, label=arm)
        ax.set_xlabel("step")
        ax.set_ylabel(score_key(task)[5:])
        ax.set_title(task, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"{result.claim.id}: dev score during training (mean over seeds)", fontsize=9)
    save_figure(fig, path)
    return True


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
                    line, = ax.plot(*zip(*pts), "o-", ms=3, label=f"seed {seed} dev loss")
                    if i < len(preds) and math.isfinite(preds[i]):
                        ax.axvline(preds[i], color=line.get_color(), ls="--", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("dev loss")
    ax.set_title(f"{result.claim.id}: dev loss; dashed: the rule's T̂", fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def _rule_text(c: dict) -> str:
    if c["rule"] in ("non_inferior", "superior"):
        return f"{c['rule']}({c['a']}, {c['b']}, margin {c.get('margin', 0)})"
    if c["rule"] == "contains":
        return f"contains({c['a']}, {c['value']})"
    return f"{c['rule']}({c['a']}, {c['threshold']})"


SPEED_INTRO = """Measured by `qkvtune bench speed` (one process per model and device, configurations interleaved round by
round, medians). × fwd: the step over one train-mode forward of the bare model; × floor: over k eval-mode forwards
(k = 1 inference, 2 adapter training: forward + input gradients, 3 full fine-tuning). merged-forward is the
merged and unwrapped model (what `qkvtune export` writes); merged-wrapped keeps qkvtune's wrappers. The `fast-`
rows use `fast_path: on` (CPU: cheap dropout masks; CUDA: `torch.compile`) against PEFT's eager step. Figures
are ratios measured side by side; run-to-run noise on these small, launch- or load-bound shapes is a few
percent, so a ratio within ±0.05 of its target is not a verdict either way."""


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


def write_report(results, path: str, command: str, seconds: float, speed_dir: str | None = None) -> None:
    out_dir = os.path.dirname(os.path.abspath(path))
    plots = os.path.join(out_dir, "claims_plots")
    os.makedirs(plots, exist_ok=True)
    lines = ["# qkvtune claims report", "",
             f"- command: `{command}`",
             f"- machine: {machine()}",
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; wall time of this invocation {seconds / 60:.1f} min "
             "(runs already in the run folder are read, not retrained)"]
    unique = {run.dir: run for r in results for s in r.runs.values() for t in s.values() for run in t.values()}
    lines += [f"- {len(unique)} training runs, {sum(r.seconds for r in unique.values()) / 60:.1f} min of training "
              "in all (as timed when each run was trained; analyses and kernels come on top)", ""]
    lines += ["## Verdicts", "", "| claim | verdict | tasks | seeds | the papers' own numbers |", "|---|---|---|---|---|"]
    for r in results:
        v = r.verdict + (f" ({r.skipped})" if r.skipped else "")
        lines.append(f"| {r.claim.id}: {r.claim.title} | **{v}** | {', '.join(r.tasks) or '–'} | {len(r.seeds)} | "
                     f"{(r.claim.paper or '–').strip()} |")
    lines += ["", "### The verdict rule", "", verdicts.__doc__.split("\n\n", 1)[1].strip(), ""]
    lines += speed_section(speed_dir)
    record = []
    for r in results:
        c = r.claim
        lines += [f"## {c.id}: {c.title}", "", f"Source: {c.source}. Config: `{os.path.relpath(c.path)}`.", ""]
        if r.skipped:
            lines += [f"Skipped: {r.skipped}.", ""]
            continue
        if c.notes:
            lines += [c.notes.strip(), ""]
        arms = [a for a in c.arms if f"score:{a}" in r.quantities]
        if arms:
            lines += ["| arm | settings | " + " | ".join(r.tasks) + " | mean |",
                      "|---|---|" + "---|" * (len(r.tasks) + 1)]
            for a in arms:
                cells = [_fmt(r.quantities.get(f"score:{a}@{t}", [])) for t in r.tasks]
                settings = ", ".join(f"{k}={v}" for k, v in (c.arms[a] or {}).items())
                lines.append(f"| {a} | {settings} | " + " | ".join(cells) + f" | {_fmt(r.quantities[f'score:{a}'])} |")
            lines.append("")
        extra = [k for k in r.quantities if not k.startswith("score:")]
        if extra:
            lines += ["| quantity | mean ± sd | per seed |", "|---|---|---|"]
            for k in extra:
                per_seed = ", ".join(f"{v:.4g}" for v in r.quantities[k])
                lines.append(f"| {k} | {_fmt(r.quantities[k])} | {per_seed} |")
            lines.append("")
        lines += ["| check | 90% interval | verdict |", "|---|---|---|"]
        for chk in r.checks:
            lines.append(f"| {_rule_text(chk)} | {chk['interval']} | {chk['verdict']} |")
        lines += ["", f"**Verdict: {r.verdict}.** Paper: {(c.paper or '–').strip()}", ""]
        for name, fn in (("scores", _plot_scores), ("curves", _plot_curves), ("stopping", _plot_loss_curves)):
            png = os.path.join(plots, f"{c.id}_{name}.png")
            if fn(r, png):
                lines += [f"![{c.id} {name}]({os.path.relpath(png, out_dir)})", ""]
        minutes = sum(run.seconds for s in r.runs.values() for t in s.values() for run in t.values()) / 60
        lines += [f"Training time of this claim's runs: {minutes:.1f} min (shared runs counted in each claim).", ""]
        record.append({"id": c.id, "verdict": r.verdict, "tasks": r.tasks, "seeds": r.seeds,
                       "quantities": r.quantities,
                       "checks": [{**{k: v for k, v in chk.items() if k != "interval"},
                                   "interval": vars(chk["interval"])} for chk in r.checks]})
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "claims.json"), "w") as f:
        json.dump({"command": command, "machine": machine(), "date": time.strftime("%Y-%m-%d"), "claims": record},
                  f, indent=2, default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else str(x))
