"""``qkvtune plan``: choose the matrices, λ and the stopping step from the pretrained NTK, before training.

1. The eNTK of all four kinds (q, k, v, o) at the pretrained weights, once, on n training and m validation
   examples (``runs.pretrained``, ``analysis.ntk``; sketched with ``--sketch-dim``).
2. The time scale. For SGD one step at rate lr moves the outputs by −(lr/n)·K·∂L/∂f: kernel time is Σ lr
   (tested against a real step). The plan simulates the square loss on ±1 targets (Malladi et al.), while runs
   use cross-entropy (a different residual), Adam (≈ lr·sign(g) per parameter, not lr·g) and LoRA (whose
   kernel at B = 0 is a scaled projection of the weights'), so one short real run (``--calibration-steps``
   steps of the config's method and optimizer on {q, v}, λ = 1, constant rate, head frozen) is matched to the
   kernel: s = the kernel time at which the linearised model has moved the training outputs as far as the real
   run did, over Σ lr. One s serves every candidate; the benchmark judges whether that holds.
3. Every candidate (targets × λ, η_V = λ·η_Q) is simulated in closed form at every evaluation step of the
   config's schedule: the predicted validation score curve and its best step.
4. The best candidate (highest predicted validation score, then lowest predicted validation loss, then
   fewest kinds) becomes ``plan.yaml``: the config with its targets, lr_ratio and max_steps, which ``qkvtune
   train`` accepts as it is. ``plan.json`` holds every curve, the ranking, the spectra, the decay exponent and
   the RWY stopping step; ``plan.md`` shows them with plots.

The kernel leaves out the task head (trained with the adapter in the real run): the plan ranks what the
attention matrices add. Selection reads the validation split: give the config ``val_size`` so the task's
dev/test file stays unseen.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .analysis import AnalysisError
from .config import ConfigError, TrainConfig, build_config, save_config
from .deltas import delta_class
from .optim import lr_for_kind
from .targets import ATTENTION_KINDS

KIND_SETS = (("v",), ("q", "v"), ("q", "k", "v"), ("q", "k", "v", "o"))
LAMBDAS = (1.0, 2.0, 4.0, 8.0)
ALL_KINDS = list(ATTENTION_KINDS)  # the plan ranks attention targets (MLP kinds: not yet)
AUTO_SKETCH_BYTES = 6 * 2**30  # above this much stored gradient, sketch (SRHT, analysis.ntk) ...
AUTO_SKETCH_DIM = 4096         # ... to this many coordinates per slice


@dataclass(frozen=True)
class Candidate:
    targets: tuple[str, ...]
    lr_ratio: float

    @property
    def name(self) -> str:
        return f"{','.join(self.targets)} λ={self.lr_ratio:g}"

    def rates(self) -> dict[str, float]:
        """Each kind's rate relative to η_Q = 1, by the optimizer's own rule (``optim.lr_for_kind``)."""
        unit = TrainConfig(lr=1.0, lr_ratio=self.lr_ratio)
        return {k: lr_for_kind(unit, k) for k in self.targets}


def candidates(kind_sets=KIND_SETS, lambdas=LAMBDAS) -> list[Candidate]:
    """targets × λ; λ only matters where v is tuned with another kind (alone, η_V just rescales time)."""
    out = []
    for kinds in kind_sets:
        for lam in lambdas if "v" in kinds and len(kinds) > 1 else (1.0,):
            out.append(Candidate(tuple(kinds), float(lam)))
    return out


def parse_candidates(kinds: str | None, lambdas: str | None) -> list[Candidate]:
    """``--kinds "v;q,v;q,k,v"`` and ``--lambdas 1,2,4`` (defaults: the four kind sets, λ ∈ {1, 2, 4, 8})."""
    sets = KIND_SETS
    if kinds:
        sets = tuple(tuple(k.strip() for k in group.split(",") if k.strip()) for group in kinds.split(";"))
        bad = [k for group in sets for k in group if k not in ALL_KINDS]
        if bad or not all(sets):
            raise ConfigError(f"--kinds: expected groups of q, k, v, o separated by ';', got {kinds!r}")
    try:
        lams = tuple(float(x) for x in lambdas.split(",")) if lambdas else LAMBDAS
    except ValueError:
        raise ConfigError(f"--lambdas: expected comma-separated numbers, got {lambdas!r}") from None
    if any(not lam > 0 for lam in lams):
        raise ConfigError(f"--lambdas: every λ must be > 0, got {lambdas!r}")
    return candidates(sets, lams)


def scores(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The validation metric of predicted outputs (T, m, C): accuracy of the margin's sign or the argmax for
    class labels, Pearson correlation for float labels (regression); (T,)."""
    if labels.is_floating_point():
        f = outputs[..., 0]
        fc, yc = f - f.mean(1, keepdim=True), labels.double() - labels.double().mean()
        return (fc * yc).sum(1) / (fc.norm(dim=1) * yc.norm()).clamp(min=1e-300)
    pred = (outputs[..., 0] > 0).long() if outputs.shape[-1] == 1 else outputs.argmax(-1)
    return (pred == labels[None]).double().mean(1)


def kernel_time(step_sizes: torch.Tensor, scale: float) -> torch.Tensor:
    """Kernel time after each step: s · Σ_{i≤S} lr_i (S = 1 … len(step_sizes))."""
    return scale * torch.cumsum(step_sizes.double(), 0)


def match_time(kernel: torch.Tensor, n: int, f0: torch.Tensor, y: torch.Tensor, moved: float) -> tuple[float, str]:
    """The kernel time τ at which the linearised model's training outputs have moved ‖f_τ − f₀‖ = ``moved``
    (gradient flow), and how it was found. One eigendecomposition; the movement grows with τ, so bisection on
    log τ ("matched"). The square loss stops moving the outputs once they reach the targets (its limit is
    r₀'s part in the kernel's range); a real run that moved them further (cross-entropy on a language model's
    label words keeps growing the margin) is matched on the movement's initial, linear speed ‖K r₀‖/n instead
    ("linear")."""
    from .analysis.kernel_sim import decompose

    basis = decompose(kernel[:n, :n], n, f0[:n], y)
    movement = lambda tau: float(basis.train_movement([tau])[0])  # noqa: E731
    if moved >= 0.999 * basis.reach:
        return moved / basis.initial_speed, "linear"
    lo, hi = 1e-12, 1.0
    while movement(hi) < moved:
        hi *= 10
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if movement(mid) < moved else (lo, mid)
        if hi / lo < 1 + 1e-6:
            break
    return math.sqrt(lo * hi), "matched"


def calibration_config(cfg: TrainConfig, out_dir: str, steps: int, n: int) -> TrainConfig:
    """The short real run that sets the time scale: the config's method and optimizer on {q, v} at λ = 1, a
    constant rate, the head frozen (the kernel has no head), no evaluation, the kernel's n examples."""
    return build_config({**cfg.to_dict(), "targets": ["q", "v"], "lr_ratio": 1.0, "lr_q": None, "lr_k": None,
                         "lr_v": None, "lr_o": None, "lr_head": 0.0, "max_steps": steps, "scheduler": "constant",
                         "warmup_ratio": 0.0, "eval_strategy": "no", "patience": None, "early_stopping": "none",
                         "max_train_samples": n, "save_total_limit": 2, "output_dir": out_dir,
                         "overwrite": True, "resume": False, "logging_steps": max(1, steps)})


def horizon(cfg: TrainConfig, tokenizer) -> int:
    """The run's length in optimizer steps: ``max_steps``, else ``epochs`` over its whole training set."""
    from .analysis.stopping import steps_per_epoch
    from .runs import task_data

    if cfg.max_steps:
        return cfg.max_steps
    n_train = len(task_data(cfg, tokenizer, cfg.max_train_samples, 1).train)
    return max(1, math.ceil(cfg.epochs * steps_per_epoch(n_train, cfg.batch_size, cfg.grad_accum)))


def kernel_examples(run, n: int, m: int, label_words: str | None, log=print) -> tuple[list, list, str, list | None]:
    """The examples the kernel is computed on and how the model's output is read: a classifier's margin or
    logits, or (a causal LM, ``label_words``) the label words' logits at the end of each prompt
    (``analysis.ntk.label_word_examples``). Returns (training examples, validation examples, output, label
    token ids)."""
    from .analysis.ntk import label_word_examples

    train_ex, val_ex = run.examples("train", n), run.examples("eval", m)
    if run.info.sequence_classifier:
        if label_words:
            raise ConfigError(f"--label-words: only for causal LM tasks; {run.cfg.task} has a {run.info.kind} head")
        return train_ex, val_ex, run.kernel_output, None
    if not run.info.causal_lm:
        raise ConfigError(f"task: plan needs a classification, regression or prompted task, not {run.info.kind}")
    if run.cfg.train_on_inputs:
        raise ConfigError("train_on_inputs: the label-word output needs the prompt/response boundary; set it false")
    ids = run.label_token_ids(label_words)
    if len(set(ids)) < len(ids):
        raise ConfigError(f"--label-words: {label_words!r} start with the same token; use words that differ there")
    (train_ex, dropped), (val_ex, dropped_val) = label_word_examples(train_ex, ids), label_word_examples(val_ex, ids)
    if dropped or dropped_val:
        log(f"plan: {dropped} training and {dropped_val} validation examples have no label word in their "
            f"response; left out")
    if len(train_ex) < 2:
        raise ConfigError(f"--label-words: {len(train_ex)} training responses of {run.cfg.task} contain one of "
                          f"{label_words!r} (as a word after a space)")
    return train_ex, val_ex, "margin" if len(ids) == 2 else "logits", ids


def kernels(run, data: list, *, output: str, label_token_ids=None, sketch_dim: int | None = None,
            sketch: str = "kron", chunk_size: int = 16, log=print):
    """The eNTK of q, k, v and o on ``data``, sketched (``AUTO_SKETCH_DIM``) when the per-example gradients
    would pass ``AUTO_SKETCH_BYTES``: what a plan costs, and what ``bench plan --cost-ns`` times. Returns the
    ``NTKResult`` and the sketch dimension used."""
    from .analysis.ntk import empirical_ntk

    stored = len(data) * sum(t.shape[0] * t.shape[1] for t in run.targets) * 4
    if sketch_dim is None and stored > AUTO_SKETCH_BYTES:
        sketch_dim = AUTO_SKETCH_DIM
        log(f"plan: {stored / 2**30:.1f} GiB of per-example gradients: sketched to {sketch_dim} coordinates a slice")
    return empirical_ntk(run.model, data, run.targets, collator=run.task.collator, output=output,
                         label_token_ids=label_token_ids, sketch_dim=sketch_dim, sketch=sketch,
                         chunk_size=chunk_size, seed=run.cfg.seed), sketch_dim


def plan(cfg: TrainConfig, out: str, *, n: int = 256, m: int = 128, sketch_dim: int | None = None,
         calibration_steps: int = 20, chunk_size: int = 16, cands: list[Candidate] | None = None,
         label_words: str | None = None, other_rates=(), sketch: str = "kron", log=print) -> dict:
    """Kernels, calibration, simulation and the recommendation; writes plan.json, plan.md (+ PNG), plan.yaml.
    ``other_rates``: also predict every candidate's best score and step at these η_Q (``by_rate`` in
    plan.json; the same kernels and time scale, kernel time ∝ the rate)."""
    from .analysis.ntk import eigenvalues, fit_decay, label_targets, outputs, rate_from_decay
    from .analysis.kernel_sim import decompose, rate_kernel
    from .analysis.stopping import predict_stopping, step_sizes
    from .runs import open_run, pretrained
    from .train import train

    if delta_class(cfg.method).needs_selection:  # its slices and blocks come from a warm-up, not from targets
        raise ConfigError(f"method: plan simulates updates on chosen matrices, not {cfg.method!r}'s selected blocks")
    cands = cands or candidates()
    t0 = time.perf_counter()
    run = pretrained(cfg, n_train=n, n_eval=m, kinds=ALL_KINDS)
    train_ex, val_ex, output, label_ids = kernel_examples(run, n, m, label_words, log)
    if not val_ex:
        raise ConfigError("val_size: plan scores candidates on validation examples; the task has none")
    n, m = len(train_ex), len(val_ex)
    log(f"plan: eNTK of {len(run.targets)} slices (q, k, v, o) on {n} training + {m} validation examples")
    res, sketch_dim = kernels(run, train_ex + val_ex, output=output, label_token_ids=label_ids,
                              sketch_dim=sketch_dim, sketch=sketch, chunk_size=chunk_size, log=log)
    if res.labels is None:
        raise AnalysisError("labels: the examples carry no per-example labels")
    n_out = res.f0.shape[1]
    per_kind = {k: v / (res.per_output.shape[0] if res.per_output is not None else 1) for k, v in res.per_kind.items()}
    y = label_targets(res.labels[:n], n_out)
    kernel_seconds = time.perf_counter() - t0

    # time scale from one short real run: how far it moved the training outputs
    t1 = time.perf_counter()
    calib_dir = os.path.join(out, "calibration")
    log(f"plan: calibration run, {calibration_steps} steps of {cfg.method} on q, v ({cfg.optim}, lr {cfg.lr:g})")
    train(calibration_config(cfg, calib_dir, calibration_steps, n))
    real = open_run(calib_dir, with_task=False)
    moved = float((outputs(real.model, train_ex, run.task.collator, output, label_ids) - res.f0[:n]).norm())
    ref = rate_kernel(per_kind, Candidate(("q", "v"), 1.0).rates())
    tau, matched = match_time(ref, n, res.f0, y, moved)
    scale = tau / (cfg.lr * calibration_steps)
    calibration_seconds = time.perf_counter() - t1
    log(f"plan: time scale s = {scale:.4g} (kernel time per unit of Σ lr; {matched})")

    # every candidate at every evaluation step of the config's schedule
    t2 = time.perf_counter()
    total = horizon(cfg, run.tokenizer)
    lrs = step_sizes(cfg.lr, total, cfg.warmup_ratio, cfg.scheduler)
    every = max(1, total // 50) if cfg.eval_strategy != "steps" else max(1, min(cfg.eval_steps or 1, total))
    steps = list(range(every, total + 1, every))
    if steps[-1] != total:
        steps.append(total)
    at_steps = torch.tensor(steps) - 1
    times = kernel_time(lrs, scale)[at_steps]
    rate_times = {float(r): kernel_time(lrs * (float(r) / cfg.lr), scale)[at_steps] for r in other_rates}
    val_labels = res.labels[n:]
    y_val = label_targets(val_labels, n_out)
    rows = []
    by_rate = {r: {} for r in rate_times}
    for c in cands:
        basis = decompose(rate_kernel(per_kind, c.rates()), n, res.f0, y)
        for r, out_r in by_rate.items():
            curve_r = scores(basis.at(rate_times[r], flow=True).val_outputs, val_labels)
            out_r[c.name] = {"best_score": float(curve_r.max()), "best_step": steps[int(torch.argmax(curve_r))]}
        sim = basis.at(times, flow=True)
        curve = scores(sim.val_outputs, val_labels)
        val_loss = 0.5 * (sim.val_outputs - y_val[None]).pow(2).sum((1, 2)) / m
        best = int(torch.argmax(curve))  # the first of equal maxima: the earliest step
        rows.append({"targets": list(c.targets), "lr_ratio": c.lr_ratio, "name": c.name, "steps": steps,
                     "val_score": curve.tolist(), "val_loss": val_loss.tolist(),
                     "train_loss": sim.train_loss.tolist(), "best_step": steps[best],
                     "best_score": float(curve[best]), "loss_at_best": float(val_loss[best])})
    ranking = sorted(rows, key=lambda r: (-r["best_score"], r["loss_at_best"], len(r["targets"])))
    pick = ranking[0]
    k_pick = rate_kernel(per_kind, Candidate(tuple(pick["targets"]), pick["lr_ratio"]).rates())
    rwy = predict_stopping(k_pick[:n, :n], residuals=y - res.f0[:n], steps=scale * lrs)
    simulate_seconds = time.perf_counter() - t2

    eigs_train = {k: eigenvalues(v[:n, :n]) for k, v in per_kind.items()}
    eigs = eigenvalues(sum(per_kind.values())[:n, :n])
    p, rng = fit_decay(eigs)
    summary = {
        "model": cfg.model, "task": cfg.task, "method": cfg.method, "optimizer": cfg.optim, "lr": cfg.lr,
        "n_train": n, "n_val": m, "output": output, "label_words": label_words, "horizon": total,
        "time_scale": {"scale": scale, "kernel_time": tau, "calibration_steps": calibration_steps,
                       "moved": moved, "matched": matched, "rule": "kernel time after S steps = scale · Σ_{i≤S} lr_i"},
        "candidates": rows, "ranking": [r["name"] for r in ranking],
        "by_rate": {f"{r:g}": v for r, v in by_rate.items()},
        "recommended": {"targets": pick["targets"], "lr_ratio": pick["lr_ratio"], "max_steps": pick["best_step"],
                        "predicted_val_score": pick["best_score"]},
        "rwy_stopping_step": rwy.step, "rwy_crossed": rwy.crossed,
        "spectrum": {"eigenvalues": eigs.tolist(), "decay_exponent": p, "decay_range": list(rng),
                     "rate_exponent": rate_from_decay(p),
                     "per_kind": {k: v.tolist() for k, v in eigs_train.items()},
                     "per_kind_trace": {k: float(v[:n, :n].trace()) for k, v in per_kind.items()}},
        "seconds": {"kernel": kernel_seconds, "calibration": calibration_seconds, "simulation": simulate_seconds,
                    "total": time.perf_counter() - t0},
        "sketch_dim": sketch_dim, "sketch": sketch if sketch_dim else None,
    }
    write_plan(summary, cfg, out)
    return summary


def recommended_config(cfg: TrainConfig, summary: dict) -> TrainConfig:
    rec = summary["recommended"]
    return build_config({**cfg.to_dict(), "targets": rec["targets"], "lr_ratio": rec["lr_ratio"],
                         "lr_q": None, "lr_k": None, "lr_v": None, "lr_o": None, "max_steps": rec["max_steps"]})


def write_plan(summary: dict, cfg: TrainConfig, out: str) -> None:
    from .analysis.plots import plot_lines, plot_spectrum
    from .files import write_json

    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "plan.json"), summary)
    save_config(recommended_config(cfg, summary), os.path.join(out, "plan.yaml"))
    plot_lines({r["name"]: (r["steps"], r["val_score"]) for r in summary["candidates"]},
               os.path.join(out, "plan_curves.png"), title="predicted validation score", xlabel="step",
               ylabel="score")
    spec = summary["spectrum"]
    plot_spectrum(torch.tensor(spec["eigenvalues"]), spec["decay_exponent"], tuple(spec["decay_range"]),
                  os.path.join(out, "plan_spectra.png"),
                  per_kind={k: torch.tensor(v) for k, v in spec["per_kind"].items()})
    rec, ts = summary["recommended"], summary["time_scale"]
    lines = [f"# Plan: {summary['model']} on {summary['task']}", "",
             f"Recommended: **targets {rec['targets']}, λ = {rec['lr_ratio']:g}, max_steps {rec['max_steps']}** "
             f"(predicted validation score {rec['predicted_val_score']:.3f}); `qkvtune train plan.yaml`.", "",
             f"Kernel: {summary['n_train']} training + {summary['n_val']} validation examples, output "
             f"{summary['output']}; decay exponent p = {spec['decay_exponent']:.3g}; RWY stopping step "
             f"{summary['rwy_stopping_step']} (the recommended kernel, this schedule).", "",
             f"Time scale: s = {ts['scale']:.4g} from {ts['calibration_steps']} real steps ({summary['method']}, "
             f"{summary['optimizer']}, lr {summary['lr']:g}; {ts['matched']}: "
             + ("the kernel moves the training outputs as far" if ts["matched"] == "matched" else
                "the real run moved the outputs past the square loss's reach; matched on the initial speed")
             + f"); {ts['rule']}.", "",
             "| rank | candidate | best step | predicted validation score | predicted validation loss there |",
             "|---|---|---|---|---|"]
    by_name = {r["name"]: r for r in summary["candidates"]}
    for i, name in enumerate(summary["ranking"], 1):
        r = by_name[name]
        lines.append(f"| {i} | {name} | {r['best_step']} | {r['best_score']:.3f} | {r['loss_at_best']:.4g} |")
    s = summary["seconds"]
    lines += ["", f"Cost: kernel {s['kernel']:.1f} s, calibration {s['calibration']:.1f} s, simulation "
              f"{s['simulation']:.1f} s, total {s['total']:.1f} s.", "",
              "![predicted validation score per candidate](plan_curves.png)", "",
              "![kernel spectra per kind](plan_spectra.png)", ""]
    with open(os.path.join(out, "plan.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# --- CLI ----------------------------------------------------------------------------------------------------

def cmd_plan(args) -> int:
    """Everything is written into a sibling ``OUT.partial`` folder that replaces OUT only once complete: a
    failed plan leaves nothing behind."""
    import shutil

    from .config import load_command_config
    from .errors import check_output_dir

    for name in ("n", "m", "calibration_steps", "chunk_size", "sketch_dim"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1, got {value}")
    cands = parse_candidates(args.kinds, args.lambdas)
    cfg = load_command_config(args.config, args.overrides)
    check_output_dir(args.out, "--out")
    out = os.path.abspath(args.out)
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError(f"--out: {out} is not empty")
    partial = out + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    try:
        summary = plan(cfg, partial, n=args.n, m=args.m, sketch_dim=args.sketch_dim,
                       calibration_steps=args.calibration_steps, chunk_size=args.chunk_size, cands=cands,
                       label_words=args.label_words, sketch=args.sketch)
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    rec = summary["recommended"]
    print(f"recommended: targets={rec['targets']} lr_ratio={rec['lr_ratio']:g} max_steps={rec['max_steps']} "
          f"(predicted validation score {rec['predicted_val_score']:.3f}); "
          f"time scale {summary['time_scale']['scale']:.4g}")
    print(f"plan: {os.path.join(out, 'plan.md')}; train it: qkvtune train {os.path.join(out, 'plan.yaml')}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="choose targets, λ and max_steps from the pretrained NTK before training")
    p.add_argument("config", nargs="?", help="run config YAML (optional) or the first key=value")
    p.add_argument("overrides", nargs="*", help="key=value as for train")
    p.add_argument("--out", required=True, help="folder for plan.json, plan.md (+ PNG) and plan.yaml")
    p.add_argument("--n", type=int, default=256, help="training examples in the kernel")
    p.add_argument("--m", type=int, default=128, help="validation examples the candidates are scored on")
    p.add_argument("--sketch-dim", type=int, help="keep k sketched gradient coordinates per matrix (large n; "
                   f"automatic above {AUTO_SKETCH_BYTES // 2**30} GiB of gradients)")
    p.add_argument("--sketch", choices=("kron", "srht"), default="kron",
                   help="kron: √k×√k Kronecker sketch, never forms a gradient (default); srht: tighter, slower")
    p.add_argument("--calibration-steps", type=int, default=20, help="real steps that set the time scale")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--label-words", help="a causal LM task: the label words its responses contain, e.g. "
                   "false,true; the kernel reads their logits where the first of them is predicted")
    add_candidate_options(p)
    p.set_defaults(func=cmd_plan)


def add_candidate_options(p) -> None:
    p.add_argument("--kinds", help='target sets separated by ";" (default: "v;q,v;q,k,v;q,k,v,o")')
    p.add_argument("--lambdas", help="λ values for sets that tune v with another kind (default: 1,2,4,8)")
