"""``qkvtune analyze ntk|stopping|subspace|amplification|task-vectors|samples`` — thin drivers that load a model,
data or adapters, call the analysis functions and write JSON + PNG into ``--out``.

Model, task and slices come from the run layer: ``runs.pretrained`` for a config (``CONFIG.yaml`` and/or
``key=value`` overrides, as for ``train``; its resolved targets, or ``--kinds`` among the config's
``target_modules``/``layers``) and ``runs.open_runs`` for adapters of finished runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import torch

from .config import DATA_KEYS, LOADING_KEYS, load_command_config
from .errors import check_output_dir
from .analysis import AnalysisError


def _kinds(spec: str | None) -> list[str] | None:
    return [k.strip() for k in spec.split(",")] if spec else None


def _overrides(args) -> dict:
    """key=value words after the adapter folders (model=… for PEFT adapters that do not name their base)."""
    from .config import parse_override

    words = list(getattr(args, "overrides", None) or []) + [a for a in getattr(args, "adapters", None) or [] if "=" in a]
    return dict(parse_override(w) for w in words)


def _out(args) -> str:
    check_output_dir(args.out, "--out")
    return args.out


# --- subcommands ------------------------------------------------------------------------------------------

def cmd_ntk(args) -> int:
    from .runs import pretrained
    from .io import load_adapter
    from .analysis.kernel_regression import kernel_predictions
    from .analysis.ntk import empirical_ntk
    from .files import write_json

    cfg = load_command_config(args.config, args.overrides)
    out = _out(args)
    run = pretrained(cfg, n_train=args.n, n_eval=args.eval_n or 1, kinds=_kinds(args.kinds))
    targets, adapter = run.targets, None
    if args.adapter:
        targets = run.targets if args.kinds else None  # an adapter without --kinds: all its deltas
        adapter = "analyzed"
        load_adapter(run.model, args.adapter, adapter)
    train = run.examples("train", args.n)
    data = train + (run.examples("eval", args.eval_n) if args.eval_n else [])
    res = empirical_ntk(run.model, data, targets, collator=run.task.collator, adapter=adapter,
                        output=args.output or run.kernel_output, label_token_ids=run.label_token_ids(args.label_words),
                        sketch_dim=args.sketch_dim, chunk_size=args.chunk_size, seed=cfg.seed)
    summary = res.subset(range(len(train))).save(out)  # the spectrum of the training examples
    if args.eval_n and res.labels is not None:
        preds = {}
        for method in ("ridge", "logistic") if not res.labels.is_floating_point() else ("ridge",):
            p = kernel_predictions(res, len(train), method=method)
            p.pop("predictions")
            preds[method] = p
        summary["kernel_predictions"] = preds
    if args.run:
        summary["fine_tuning"] = _run_metrics(args.run)
    summary.update(model=cfg.model, task=cfg.task)
    write_json(os.path.join(out, "ntk.json"), summary)
    _print({k: summary[k] for k in ("n", "decay_exponent", "rate_exponent", "effective_dim", "seconds",
                                    "kernel_predictions") if k in summary})
    return 0


def _run_metrics(run_dir: str) -> dict:
    from .files import read_json

    return read_json(os.path.join(run_dir, "metrics.json"), AnalysisError)


def cmd_stopping(args) -> int:
    from .runs import pretrained
    from .checkpoints import best_step
    from .analysis.ntk import empirical_ntk
    from .files import write_json
    from .analysis.stopping import predict_stopping, steps_per_epoch

    cfg = load_command_config(args.config, args.overrides)
    out = _out(args)
    run = pretrained(cfg, n_eval=1, kinds=_kinds(args.kinds))
    res = empirical_ntk(run.model, run.examples("train", args.n), run.targets, collator=run.task.collator,
                        output=args.output or run.kernel_output, label_token_ids=run.label_token_ids(args.label_words),
                        sketch_dim=args.sketch_dim, chunk_size=args.chunk_size, seed=cfg.seed)
    if res.labels is None:
        raise AnalysisError("task: stopping needs per-example labels (a classification or regression task)")
    n_train = len(run.task.train)
    spe = steps_per_epoch(n_train, cfg.batch_size, cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * spe))
    pred = predict_stopping(res.kernel, residuals=res.label_targets() - res.f0, sigma=args.sigma, lr=cfg.lr,
                            total_steps=total, warmup_ratio=cfg.warmup_ratio, scheduler=cfg.scheduler,
                            n_train=n_train, batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
    pred.extra.update(model=cfg.model, task=cfg.task, kernel_n=len(res.kernel), lr=cfg.lr, optimizer=cfg.optim,
                      targets=[t.name for t in run.targets],
                      assumption="SGD-equivalent steps on the square loss (see qkvtune.analysis.stopping)")
    if args.run:
        pred.extra["observed_best_step"] = best_step(args.run)
    summary = pred.save(out)
    res.save(out, "stopping_ntk")
    write_json(os.path.join(out, "stopping.json"), summary)
    _print({k: summary[k] for k in ("predicted_step", "predicted_epoch", "crossed", "eta_hat", "sigma", "rkhs_norm",
                                    "horizon")}
           | ({"observed_best_step": summary["observed_best_step"]} if args.run else {}))
    return 0


def cmd_subspace(args) -> int:
    from .runs import open_runs
    from .analysis.plots import plot_heatmap_grid
    from .files import write_json
    from .analysis.subspace import compare_adapters

    out = _out(args)
    a, b = open_runs([args.adapter1, args.adapter2], _overrides(args))
    phis = compare_adapters(a.model, a.adapter, b.adapter, args.side)
    summary = {"side": args.side, "adapters": [args.adapter1, args.adapter2],
               "phi": {k: v.tolist() for k, v in phis.items()},
               "phi_top1": {k: float(v[0, 0]) for k, v in phis.items()}}
    write_json(os.path.join(out, "subspace.json"), summary)
    plot_heatmap_grid(phis, os.path.join(out, "subspace.png"), title=f"φ(i, j) on {args.side}",
                      xlabel="j (adapter 2)", ylabel="i (adapter 1)")
    _print({"slices": len(phis), "mean_phi_top1": sum(summary["phi_top1"].values()) / len(phis)})
    return 0


def cmd_amplification(args) -> int:
    from .runs import open_runs
    from .analysis.plots import plot_bars, plot_lines
    from .files import write_json
    from .analysis.subspace import amplification, delta_weights, spectrum

    out = _out(args)
    (run,) = open_runs([args.adapter], _overrides(args))
    rows = {}
    spectra = {}
    for key, (dw, w) in delta_weights(run.model, run.adapter).items():
        rows[key] = amplification(dw, w, args.rank)
        spectra[key] = spectrum(dw)
    write_json(os.path.join(out, "amplification.json"), {"adapter": args.adapter, "matrices": rows, "spectra": spectra})
    plot_bars({k: v["factor"] for k, v in rows.items()}, os.path.join(out, "amplification.png"),
              title="amplification ‖ΔW‖/‖UᵀWV‖", ylabel="factor")
    plot_bars({}, os.path.join(out, "projections.png"), title="‖UᵀWV‖_F by direction set", log=True,
              groups={g: {k: v[f"proj_{g}"] for k, v in rows.items()} for g in ("delta_dirs", "w_dirs", "random")})
    plot_lines({k: (range(1, len(s["singular_values"]) + 1), s["singular_values"])
                for k, s in list(spectra.items())[:12]}, os.path.join(out, "spectra.png"),
               title="singular values of ΔW", xlabel="i", log="y")
    _print({k: round(v["factor"], 3) for k, v in rows.items()})
    return 0


def cmd_task_vectors(args) -> int:
    from .runs import open_runs
    from .attach import heads_only, set_adapter
    from .evaluation import accuracy
    from .analysis.ntk import empirical_ntk
    from .analysis.plots import plot_heatmap, plot_lines
    from .files import write_json
    from .analysis.task_vectors import TaskVector, apply, choose_coefficient, combine, similarity_report

    out = _out(args)
    dirs = [a for a in args.adapters if "=" not in a]
    runs = open_runs(dirs, _overrides(args), n_train=max(1, args.kernel_n), n_eval=args.eval_n or None)
    model = runs[0].model
    labels = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    vectors = {lab: TaskVector.from_model(model, r.adapter) for lab, r in zip(labels, runs)}
    kernels = None
    if args.kernel_n:  # each task's kernel on one shared probe set (examples of every task)
        probe = [ex for r in runs for ex in r.examples("train", args.kernel_n)]
        binary = all(r.kernel_output == "margin" for r in runs)
        # the first run's slices (or --kinds of them): every task's kernel over the same parameters
        targets = [t for t in runs[0].targets if args.kinds is None or t.kind in _kinds(args.kinds)]
        if not targets:
            raise AnalysisError(f"--kinds: the first run has no slice of kinds {args.kinds}")
        kernels = {}
        for lab, r in zip(labels, runs):
            set_adapter(model, r.adapter)  # task r's fine-tuned weights and head
            kernels[lab] = empirical_ntk(model, probe, targets, collator=r.task.collator,
                                         output="margin" if binary else "logits", chunk_size=args.chunk_size).kernel
    report = similarity_report(vectors, kernels)
    plot_heatmap(torch.tensor(report["cosine"]), os.path.join(out, "task_vector_cosine.png"),
                 title="cos(τ_s, τ_t)", labels=labels)
    if kernels:
        plot_heatmap(torch.tensor(report["kernel_alignment"]), os.path.join(out, "kernel_alignment.png"),
                     title="NTK alignment", labels=labels)
    classify = [i for i, r in enumerate(runs) if r.info.sequence_classifier and not r.info.regression and r.task.evals]
    if args.eval_n and classify:
        evals = {i: runs[i].examples("eval", args.eval_n) for i in classify}

        def task_accuracy(m, i):  # θ₀ (+ applied task vectors) with task i's head
            with heads_only(m, runs[i].adapter):
                return accuracy(m, evals[i], runs[i].task.collator)

        total = combine(list(vectors.values()))
        search = choose_coefficient(model, total, lambda m: sum(task_accuracy(m, i) for i in classify) / len(classify),
                                    [float(c) for c in args.coefs.split(",")])
        report["coefficient_search"] = search
        accs = {labels[i]: {"base": task_accuracy(model, i)} for i in classify}
        apply(model, total, search["coef"])  # all tasks at once: interference shows as a drop per task
        for i in classify:
            accs[labels[i]]["sum_at_coef"] = task_accuracy(model, i)
        apply(model, total, -search["coef"])
        for i in classify:
            set_adapter(model, runs[i].adapter)
            accs[labels[i]]["fine_tuned"] = accuracy(model, evals[i], runs[i].task.collator)
        report["accuracy"] = accs
        plot_lines({"mean accuracy": (list(search["scores"]), list(search["scores"].values()))},
                   os.path.join(out, "coefficient.png"), title="θ₀ + λ Σ τ_t on validation", xlabel="λ")
    write_json(os.path.join(out, "task_vectors.json"), report)
    _print({k: report[k] for k in ("names", "cosine")} | (
        {"coef": report["coefficient_search"]["coef"]} if "coefficient_search" in report else {}))
    return 0


def cmd_samples(args) -> int:
    from .runs import pretrained
    from .config import build_config
    from .data.families import main_metric
    from .data.metrics import greater_is_better
    from .train import train  # the one analysis that trains
    from .analysis.ntk import empirical_ntk, rate_from_decay
    from .analysis.plots import plot_lines
    from .files import write_json
    from .analysis.samples import fit_slope, geometric_grid

    cfg = load_command_config(args.config, args.overrides)
    out = _out(args)
    ns = [int(n) for n in args.ns.split(",")] if args.ns else geometric_grid(*[int(v) for v in args.grid.split(":")])
    runs = []
    for n in ns:
        run_cfg = build_config({**cfg.to_dict(), "max_train_samples": n, "output_dir": os.path.join(out, f"n{n}")})
        metrics = train(run_cfg)
        key = "eval_" + main_metric(cfg.task)  # the task's own score; the loss for language modelling
        err = (1.0 - metrics[key] if greater_is_better(key[5:]) else metrics[key]) if key in metrics else math.nan
        runs.append({"n": n, "error": err, "metric": key, "metrics": metrics})
    slope = fit_slope(ns, [r["error"] for r in runs])
    kernel_n = args.kernel_n or max(ns)
    run = pretrained(cfg, n_train=kernel_n, n_eval=1, kinds=_kinds(args.kinds))
    res = empirical_ntk(run.model, run.examples("train", kernel_n), run.targets, collator=run.task.collator,
                        output=run.kernel_output, label_token_ids=run.label_token_ids(args.label_words),
                        chunk_size=args.chunk_size)
    summary = {"ns": ns, "runs": runs, "error_slope": slope, "kernel_decay_exponent": res.decay_exponent,
               "kernel_rate": -rate_from_decay(res.decay_exponent), "kernel_n": len(res.kernel),
               "note": "kernel_rate is the excess-risk exponent n^(-p/(p+1)) from λ_i ~ i^(-p); error_slope fits the "
                       "raw error, which also holds the irreducible part"}
    write_json(os.path.join(out, "samples.json"), summary)
    e0 = runs[0]["error"]
    series = {"error": (ns, [r["error"] for r in runs])}
    if slope == slope:
        series[f"fit slope {slope:.2f}"] = (ns, [e0 * (n / ns[0]) ** slope for n in ns])
    if summary["kernel_rate"] == summary["kernel_rate"]:
        series[f"kernel rate {summary['kernel_rate']:.2f}"] = (ns, [e0 * (n / ns[0]) ** summary["kernel_rate"] for n in ns])
    plot_lines(series, os.path.join(out, "samples.png"), title="error vs training examples", xlabel="n",
               ylabel="error", log="xy")
    _print({k: summary[k] for k in ("ns", "error_slope", "kernel_rate")})
    return 0


# --- parser -----------------------------------------------------------------------------------------------

def _print(obj) -> None:
    from .files import jsonable

    print(json.dumps(jsonable(obj), indent=2, sort_keys=True))


def _with_config(p):
    p.add_argument("config", nargs="?", help="run config YAML (optional) or the first key=value")
    p.add_argument("overrides", nargs="*", help="key=value as for train (model=..., task=..., data_dir=...)")


def _with_kernel(p, n_default: int = 256):
    p.add_argument("--n", type=int, default=n_default, help="training examples in the kernel")
    p.add_argument("--kinds", help="matrix kinds, e.g. v, q,k,v,o, up,down or v,mlp (default: the config's targets)")
    p.add_argument("--output", choices=["margin", "logits"], help="f (default: margin for binary tasks)")
    p.add_argument("--label-words", help="causal LM: comma-separated label words")
    p.add_argument("--sketch-dim", type=int, help="keep k sketched coordinates per matrix")
    p.add_argument("--chunk-size", type=int, default=16)


def _check(args) -> None:
    """Counts must be positive (eval/kernel sizes may be 0 = off); checked before any loading."""
    for name in ("n", "chunk_size", "sketch_dim", "rank", "eval_n", "kernel_n"):
        value = getattr(args, name, None)
        if value is not None and (value < 0 or (value == 0 and name not in ("eval_n", "kernel_n"))):
            raise AnalysisError(f"--{name.replace('_', '-')}: must be {'>= 0' if name.endswith('_n') else '>= 1'}, "
                                f"got {value}")


def _checked(func):
    def run(args):
        _check(args)  # before any loading; errors reach cli.main, which prints them in one line
        return func(args)
    return run


ADAPTER_HONOURS = (set(LOADING_KEYS), "model-loading keys: model, dtype, trust_remote_code, allow_pickle")


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``analyze`` and its subcommands to the ``qkvtune`` parser's subparsers; each sets ``func``."""
    parser = subparsers.add_parser("analyze", help="theory diagnostics: ntk, stopping, subspace, amplification, "
                                                   "task-vectors, samples")
    sub = parser.add_subparsers(dest="analysis", required=True)

    p = sub.add_parser("ntk", help="empirical NTK spectrum (+ kernel predictions with --eval-n)")
    _with_config(p)
    _with_kernel(p)
    p.add_argument("--eval-n", type=int, default=0, help="also score kernel regression on this many eval examples")
    p.add_argument("--adapter", help="adapter folder: the kernel of its delta parameters instead of the weights")
    p.add_argument("--run", help="fine-tuning run folder whose metrics.json is reported alongside")
    p.set_defaults(func=_checked(cmd_ntk))

    p = sub.add_parser("stopping", help="predicted early-stopping step/epoch before training (RWY 2014)")
    _with_config(p)
    _with_kernel(p)
    p.add_argument("--sigma", type=float, help="noise level (default: estimated by kernel ridge + leave-one-out)")
    p.add_argument("--run", help="finished run folder: report its observed best step next to the prediction")
    p.set_defaults(func=_checked(cmd_stopping))

    p = sub.add_parser("subspace", help="φ(i, j) subspace similarity between two adapters (LoRA §7.2)")
    p.add_argument("adapter1", help="a qkvtune run folder or a PEFT adapter folder")
    p.add_argument("adapter2")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model=… when a PEFT adapter does not name its base")
    p.add_argument("--side", choices=["A", "B"], default="A")
    p.set_defaults(func=_checked(cmd_subspace), honours=ADAPTER_HONOURS)

    p = sub.add_parser("amplification", help="amplification factor and ΔW spectra of an adapter (LoRA §7.3)")
    p.add_argument("adapter", help="a qkvtune run folder or a PEFT adapter folder")
    p.add_argument("overrides", nargs="*", help="key=value, e.g. model=… when a PEFT adapter does not name its base")
    p.add_argument("--rank", type=int, help="r of the projection (default: the numerical rank of ΔW)")
    p.set_defaults(func=_checked(cmd_amplification), honours=ADAPTER_HONOURS)

    p = sub.add_parser("task-vectors", help="cosines, kernel alignment and a coefficient search for task vectors")
    p.add_argument("adapters", nargs="+", help="run folders or PEFT adapter folders (one base model), then key=value")
    p.add_argument("--kernel-n", type=int, default=0, help="examples per task in the shared kernel probe set")
    p.add_argument("--kinds", help="matrix kinds of the kernels (default: the first run's targets)")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--eval-n", type=int, default=0, help="validation examples per task for the coefficient search")
    p.add_argument("--coefs", default="0,0.2,0.4,0.6,0.8,1.0,1.2", help="comma-separated λ values")
    p.set_defaults(func=_checked(cmd_task_vectors), overrides=[],
                   honours=({*LOADING_KEYS, *DATA_KEYS, "eval_batch_size", "seed"},
                            "data, evaluation and model-loading keys"))

    p = sub.add_parser("samples", help="fine-tune on a geometric grid of n and fit the error-vs-n slope")
    _with_config(p)
    p.add_argument("--ns", help="comma-separated sizes, e.g. 64,128,256")
    p.add_argument("--grid", default="64:512:4", help="n_min:n_max:points (geometric)")
    p.add_argument("--kernel-n", type=int, help="examples in the kernel (default: the largest n)")
    p.add_argument("--kinds")
    p.add_argument("--label-words")
    p.add_argument("--chunk-size", type=int, default=16)
    p.set_defaults(func=_checked(cmd_samples))

    for action in sub.choices.values():
        action.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    return parser
