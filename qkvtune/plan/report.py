"""What a plan says: plan.md (ranking, groups, budget, plots), plan.json, and plan.yaml (the config to train)."""

from __future__ import annotations

import math
import os

import torch

from ..config import TrainConfig, build_config, save_config
from .readout import better

def verdict_sentence(summary: dict) -> str:
    """One sentence: which of attention only, the MLP only and all-linear the kernel expects to win, by how much."""
    g = summary["groups"]
    metric = summary["metric"]
    stable = {k: v for k, v in g.items() if not v["unstable"]}
    if not stable:
        return "The kernel expects no group of targets to train stably at these rates."
    key = better(metric)
    order = sorted(stable, key=lambda k: key(stable[k]["score"]))
    win = order[0]
    others = "; ".join(f"{k} {stable[k]['score']:.4g} ({stable[k]['best']}), "
                       f"{abs(stable[win]['score'] - stable[k]['score']):.3g} {'lower' if metric != 'loss' else 'higher'}"
                       for k in order[1:])
    what = "validation loss" if metric == "loss" else f"validation {metric}"
    return (f"On this model and data the kernel expects **{win}** to win: predicted {what} "
            f"{stable[win]['score']:.4g} ({stable[win]['best']})" + (f", against {others}." if others else "."))


def default_sentence(rec: dict, metric: str) -> str:
    """Why the recommendation is, or is not, the simple default (planner.keep_default)."""
    if not rec.get("default"):
        return ""
    if rec.get("default_kept"):
        return (f"The recommendation is the simple default, all-linear λ = 1: the best other candidate "
                f"({rec['best_other']}) is predicted {max(rec['margin'], 0):.3g} better in validation {metric}, within "
                f"twice the noise a validation score on these points carries ({rec['noise']:.3g}) — below what the "
                f"plan can resolve. ")
    return (f"Recommended over the default (all-linear λ = 1) by a predicted {rec['margin']:.3g} in validation "
            f"{metric}, more than twice its noise ({rec['noise']:.3g}). ")


def recommended_config(cfg: TrainConfig, summary: dict) -> TrainConfig:
    rec, budget = summary["recommended"], summary["budget"]
    keys = {"targets": rec["targets"], "lr_ratio": rec["lr_ratio"], "lr": rec["lr"], "lr_q": None, "lr_k": None,
            "lr_v": None, "lr_o": None, "max_steps": rec["max_steps"]}
    if budget.get("found") == "steps" and cfg.eval_steps:
        keys["eval_steps"] = budget["eval_steps"]
    if budget.get("found") == "examples" and cfg.max_train_samples:
        keys["max_train_samples"] = int(math.ceil(cfg.max_train_samples * budget["examples_factor"]))
    return build_config({**cfg.to_dict(), **keys})


def write_plan(summary: dict, cfg: TrainConfig, out: str) -> None:
    from ..analysis.plots import plot_lines, plot_spectrum
    from ..files import write_json

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "plan.json"), summary)
    save_config(recommended_config(cfg, summary), os.path.join(out, "plan.yaml"))
    metric = summary["metric"]
    best_lr = {}
    for r in summary["candidates"]:  # one line per candidate: its best rate's curve
        if r["name"] not in best_lr:
            best_lr[r["name"]] = r
    plot_lines({f"{r['name']} lr={r['lr']:g}" + (" (unstable)" if r["unstable"] else ""): (r["steps"], r["val_score"])
                for r in best_lr.values()}, os.path.join(out, "plan_curves.png"),
               title=f"predicted validation {metric}, each candidate at its best rate", xlabel="step", ylabel=metric)
    spec = summary["spectrum"]
    plot_spectrum(torch.tensor(spec["eigenvalues"]), spec["decay_exponent"], tuple(spec["decay_range"]),
                  os.path.join(out, "plan_spectra.png"),
                  per_kind={k: torch.tensor(v) for k, v in spec["per_kind"].items()})
    rec, ts, budget = summary["recommended"], summary["time_scale"], summary["budget"]
    lines = [f"# Plan: {summary['model']} on {summary['task']}", ""]
    if budget.get("found") not in (None, "configured"):
        cap = budget.get("cap")
        configured = budget.get("max_steps_configured")
        if budget["found"] == "steps":
            lines += [f"**No candidate is predicted to reach {summary['goal']:.4g} ({metric}) within the configured "
                      f"{configured} steps; at ×{budget['factor']} ({budget['max_steps']} steps) one does.**", ""]
        elif budget["found"] == "examples":
            lines += [f"**No candidate is predicted to reach {summary['goal']:.4g} ({metric}) within {configured} "
                      f"steps, nor by ×{cap} of them; the kernel's learning curve over n (slope "
                      f"{budget['slope']:.2f}) says about ×{budget['examples_factor']:.1f} the training examples "
                      f"would.**", ""]
        else:
            lines += [f"**No candidate is predicted to reach {summary['goal']:.4g} ({metric}) within {configured} "
                      f"steps, nor by ×{cap} of them (steps), nor by more examples within ×{cap}: the kernel foresees "
                      f"no learning at this budget.**", ""]
    rate = (f"lr auto (the kernel's rate {rec['kernel_lr']:g})" if rec["lr"] == "auto" else f"lr {rec['lr']:g}")
    lines += [f"Recommended: **targets {rec['targets']}, λ = {rec['lr_ratio']:g}, {rate}, max_steps "
              f"{rec['max_steps']}** (predicted validation {metric} {rec['predicted_val_score']:.4g}; "
              + (f"the pretrained model's {summary['baseline']:.4g}" if metric == "loss" else
                 f"the constant predictor's {summary['baseline']:.4g}") + "); `qkvtune train plan.yaml`.", "",
              default_sentence(rec, metric), verdict_sentence(summary), "",
              f"Kernel: {summary['n_train']} training + {summary['n_val']} validation points; {summary['readout']}; "
              f"kinds {', '.join(summary['kinds'])}; loss {summary['loss']}; decay exponent p = "
              f"{summary['spectrum']['decay_exponent']:.3g}.", "",
              f"Optimizer {summary['optimizer']} simulated as {summary['update_rule']}"
              + (f" (β₁ = {summary['beta']:g}; stability edge {2 * (1 + summary['beta']) / (1 - summary['beta']):.0f})"
                 if summary["update_rule"] == "adam" else " (stability edge 2)")
              + f"; time scale s = {ts['scale']:.4g} from {ts['calibration_steps']} real steps at lr "
              f"{summary['lr']:g} (s = 1: the derivation moves the outputs as far as the run did).", "",
              f"| rank | candidate | lr | parameters | best step | predicted validation {metric} | stability "
              f"(η·λ_max / edge) |", "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(summary["candidates"], 1):
        lines.append(f"| {i} | {r['name']} | {r['lr']:g} | {summary['parameters'].get(r['name'], 0):,} | "
                     f"{r['best_step']} | {r['best_score']:.4g}{' (fails)' if r['unstable'] else ''} | "
                     f"{r['edge_ratio']:.2f}{' **unstable**' if r['unstable'] else ''} |")
    s = summary["seconds"]
    lines += ["", f"Cost: kernel {s['kernel']:.1f} s, calibration {s['calibration']:.1f} s, simulation "
              f"{s['simulation']:.1f} s, total {s['total']:.1f} s.", "",
              "![predicted validation score per candidate](plan_curves.png)", "",
              "![kernel spectra per kind](plan_spectra.png)", ""]
    with open(os.path.join(out, "plan.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


def plan_budget_line(summary: dict) -> str:
    """The one line that says the configured budget will not learn, and what will."""
    b = summary["budget"]
    head = (f"no candidate is predicted to reach {summary['goal']:.4g} ({summary['metric']}) within "
            f"{b.get('max_steps_configured')} steps")
    if b["found"] == "steps":
        return f"{head}: extended to {b['max_steps']} steps (×{b['factor']})"
    if b["found"] == "examples":
        return f"{head} nor ×{b['cap']}: about ×{b['examples_factor']:.1f} the training examples are needed"
    return f"{head}, nor by ×{b['cap']} steps or examples: none does by the cap"


