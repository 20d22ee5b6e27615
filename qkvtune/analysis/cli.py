"""``qkvtune analyze ntk|stopping|subspace|amplification|task-vectors|samples`` — thin drivers that load a model,
data or adapters, call the analysis functions and write JSON + PNG into ``--out``.

Model and task come from a run config (``CONFIG.yaml`` and/or ``key=value`` overrides, as for ``train``) or,
for adapter analyses, from the runs the adapters were trained in (their ``config.yaml``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import torch

from . import AnalysisError


# --- loading ----------------------------------------------------------------------------------------------

def _config(config: str | None, overrides: list[str]):
    from ..config import load_config

    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides, config = [config, *overrides], None
    return load_config(config, overrides)


def _task(cfg, tok, n_train: int | None, n_eval: int | None = None):
    from ..data import load_task

    return load_task(cfg.task, tok, data_dir=cfg.data_dir, max_length=cfg.max_length,
                     max_train_samples=n_train, max_eval_samples=n_eval if n_eval else 1, seed=cfg.seed,
                     train_on_inputs=cfg.train_on_inputs)


def _load(cfg, n_train: int | None, n_eval: int | None = None):
    """(model, tokenizer, task) at the pretrained weights, with ``n_train`` training examples."""
    from transformers import set_seed

    from ..models import load_model, load_tokenizer

    set_seed(cfg.seed)  # the fresh task head is random: seed it
    tok = load_tokenizer(cfg.model, cfg.trust_remote_code)
    task = _task(cfg, tok, n_train, n_eval)
    model, tok, _ = load_model(cfg.model, task.kind, max(task.num_labels, 1), cfg.dtype, cfg.trust_remote_code, tok)
    return model, tok, task


def _run_config(run_dir: str):
    from ..config import load_config

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(path):
        raise AnalysisError(f"adapter: {run_dir} has no config.yaml (pass a run folder written by qkvtune train)")
    return load_config(path)


def _load_adapters(run_dirs: list[str], n_eval: int | None = None, n_train: int = 1):
    """Base model of the first run with every run's adapter attached as r0, r1, …; and each run's task."""
    from ..io import load_adapter

    cfgs = [_run_config(d) for d in run_dirs]
    model, tok, task = _load(cfgs[0], n_train, n_eval)
    tasks = [task]
    for cfg in cfgs[1:]:
        tasks.append(_task(cfg, tok, n_train, n_eval) if cfg.task != cfgs[0].task else task)
    names = [f"r{i}" for i in range(len(run_dirs))]
    for name, d in zip(names, run_dirs):
        load_adapter(model, d, name, activate=False)
    return model, tok, cfgs, tasks, names


def _kinds(spec, cfg) -> list[str]:
    return [k.strip() for k in spec.split(",")] if spec else list(cfg.targets)


def _output(task, spec: str | None) -> str:
    if spec:
        return spec
    return "margin" if task.kind == "classification" and task.num_labels == 2 else "logits"


def _label_ids(tok, task, words: str | None):
    if task.kind not in ("causal_lm", "qa_generation"):
        return None
    if not words:
        raise AnalysisError("--label-words: a causal LM needs the label words, e.g. --label-words negative,positive")
    return [tok(" " + w.strip(), add_special_tokens=False)["input_ids"][0] for w in words.split(",")]


def _examples(ds, n: int | None):
    return [ds[i] for i in range(min(len(ds), n or len(ds)))]


# --- subcommands ------------------------------------------------------------------------------------------

def cmd_ntk(args) -> int:
    from .kernel_regression import kernel_predictions
    from .ntk import empirical_ntk
    from .plots import write_json

    cfg = _config(args.config, args.overrides)
    model, tok, task = _load(cfg, args.n, args.eval_n or None)
    adapter = None
    if args.adapter:
        from ..io import load_adapter

        load_adapter(model, args.adapter, "analyzed")
        adapter = "analyzed"
    train = _examples(task.train, args.n)
    data = train + (_examples(next(iter(task.evals.values())), args.eval_n) if args.eval_n else [])
    kinds = None if adapter and not args.kinds else _kinds(args.kinds, cfg)  # adapter: all its deltas
    res = empirical_ntk(model, data, collator=task.collator, kinds=kinds, layers=cfg.layers, adapter=adapter,
                        output=_output(task, args.output), label_token_ids=_label_ids(tok, task, args.label_words),
                        sketch_dim=args.sketch_dim, chunk_size=args.chunk_size, seed=cfg.seed)
    summary = res.subset(range(len(train))).save(args.out)  # the spectrum of the training examples
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
    write_json(os.path.join(args.out, "ntk.json"), summary)
    _print({k: summary[k] for k in ("n", "decay_exponent", "rate_exponent", "effective_dim", "seconds",
                                    "kernel_predictions") if k in summary})
    return 0


def _run_metrics(run_dir: str) -> dict:
    path = os.path.join(run_dir, "metrics.json")
    if not os.path.exists(path):
        raise AnalysisError(f"--run: {path} not found")
    with open(path) as f:
        return json.load(f)


def observed_best_step(run_dir: str) -> int | None:
    """The best evaluation step of a finished Trainer run (from its last checkpoint's trainer_state.json)."""
    states = sorted((int(d.split("-")[-1]), d) for d in os.listdir(run_dir) if d.startswith("checkpoint-"))
    for _, d in reversed(states):
        path = os.path.join(run_dir, d, "trainer_state.json")
        if os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            if state.get("best_global_step"):
                return int(state["best_global_step"])
            best = state.get("best_model_checkpoint")
            return int(best.rstrip("/").split("-")[-1]) if best else None
    return None


def cmd_stopping(args) -> int:
    from .ntk import empirical_ntk
    from .plots import write_json
    from .stopping import predict_stopping, steps_per_epoch

    cfg = _config(args.config, args.overrides)
    model, tok, task = _load(cfg, cfg.max_train_samples)
    train = _examples(task.train, args.n)
    res = empirical_ntk(model, train, collator=task.collator, kinds=_kinds(args.kinds, cfg), layers=cfg.layers,
                        output=_output(task, args.output), label_token_ids=_label_ids(tok, task, args.label_words),
                        sketch_dim=args.sketch_dim, chunk_size=args.chunk_size, seed=cfg.seed)
    if res.labels is None:
        raise AnalysisError("task: stopping needs per-example labels (a classification or regression task)")
    y = res.labels.double()[:, None] if res.labels.is_floating_point() else (
        (2.0 * res.labels.double() - 1.0)[:, None] if res.f0.shape[1] == 1 else
        torch.nn.functional.one_hot(res.labels.long(), res.f0.shape[1]).double())
    n_train = len(task.train)
    spe = steps_per_epoch(n_train, cfg.batch_size, cfg.grad_accum)
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * spe))
    pred = predict_stopping(res.kernel, residuals=y - res.f0, sigma=args.sigma, lr=cfg.lr, total_steps=total,
                            warmup_ratio=cfg.warmup_ratio, scheduler=cfg.scheduler, n_train=n_train,
                            batch_size=cfg.batch_size, grad_accum=cfg.grad_accum)
    pred.extra.update(model=cfg.model, task=cfg.task, kernel_n=len(train), lr=cfg.lr, optimizer=cfg.optim,
                      assumption="SGD-equivalent steps on the square loss (see qkvtune.analysis.stopping)")
    if args.run:
        pred.extra["observed_best_step"] = observed_best_step(args.run)
    summary = pred.save(args.out)
    res.save(args.out, "stopping_ntk")
    write_json(os.path.join(args.out, "stopping.json"), summary)
    _print({k: summary[k] for k in ("predicted_step", "predicted_epoch", "crossed", "eta_hat", "sigma", "rkhs_norm",
                                    "horizon")}
           | ({"observed_best_step": summary["observed_best_step"]} if args.run else {}))
    return 0


def cmd_subspace(args) -> int:
    from .plots import plot_heatmap_grid, write_json
    from .subspace import compare_adapters

    model, _, _, _, names = _load_adapters([args.adapter1, args.adapter2])
    phis = compare_adapters(model, names[0], names[1], args.side)
    out = {"side": args.side, "adapters": [args.adapter1, args.adapter2],
           "phi": {k: v.tolist() for k, v in phis.items()},
           "phi_top1": {k: float(v[0, 0]) for k, v in phis.items()}}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "subspace.json"), out)
    plot_heatmap_grid(phis, os.path.join(args.out, "subspace.png"), title=f"φ(i, j) on {args.side}",
                      xlabel="j (adapter 2)", ylabel="i (adapter 1)")
    _print({"slices": len(phis), "mean_phi_top1": sum(out["phi_top1"].values()) / len(phis)})
    return 0


def cmd_amplification(args) -> int:
    from .plots import plot_bars, plot_lines, write_json
    from .subspace import amplification, delta_weights, spectrum

    model, _, _, _, names = _load_adapters([args.adapter])
    rows = {}
    spectra = {}
    for key, (dw, w) in delta_weights(model, names[0]).items():
        rows[key] = amplification(dw, w, args.rank)
        spectra[key] = spectrum(dw)
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "amplification.json"),
               {"adapter": args.adapter, "matrices": rows, "spectra": spectra})
    plot_bars({k: v["factor"] for k, v in rows.items()}, os.path.join(args.out, "amplification.png"),
              title="amplification ‖ΔW‖/‖UᵀWV‖", ylabel="factor")
    plot_bars({}, os.path.join(args.out, "projections.png"), title="‖UᵀWV‖_F by direction set", log=True,
              groups={g: {k: v[f"proj_{g}"] for k, v in rows.items()} for g in ("delta_dirs", "w_dirs", "random")})
    plot_lines({k: (range(1, len(s["singular_values"]) + 1), s["singular_values"])
                for k, s in list(spectra.items())[:12]}, os.path.join(args.out, "spectra.png"),
               title="singular values of ΔW", xlabel="i", log="y")
    _print({k: round(v["factor"], 3) for k, v in rows.items()})
    return 0


@contextlib.contextmanager
def _heads_only(model, name: str):
    """Adapter ``name``'s task head on, every delta off: the model is θ₀ (+ applied task vectors) with that head."""
    from ..attach import DeltaProjection, set_adapter

    set_adapter(model, name)
    wrappers = [m for m in model.modules() if isinstance(m, DeltaProjection)]
    saved = [list(m.active) for m in wrappers]
    for m in wrappers:
        m.active = []
    try:
        yield
    finally:
        for m, a in zip(wrappers, saved):
            m.active = a


@torch.no_grad()
def accuracy(model, examples, collator, batch_size: int = 64) -> float:
    """Plain argmax accuracy of a sequence classifier on tokenized examples."""
    model.eval()
    device = next(model.parameters()).device
    right = 0
    for s in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collator(examples[s:s + batch_size]).items()}
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
    return right / max(1, len(examples))


def cmd_task_vectors(args) -> int:
    from ..attach import set_adapter
    from .ntk import empirical_ntk
    from .plots import plot_heatmap, plot_lines, write_json
    from .task_vectors import TaskVector, apply, choose_coefficient, combine, similarity_report

    model, tok, cfgs, tasks, names = _load_adapters(args.adapters, args.eval_n, max(1, args.kernel_n))
    labels = [os.path.basename(os.path.normpath(d)) for d in args.adapters]
    if len(set(labels)) < len(labels):
        labels = [f"{i}:{lab}" for i, lab in enumerate(labels)]
    vectors = {lab: TaskVector.from_model(model, n) for lab, n in zip(labels, names)}
    kernels = None
    if args.kernel_n:  # each task's kernel on one shared probe set (examples of every task)
        probe = [ex for t in tasks for ex in _examples(t.train, args.kernel_n)]
        binary = all(t.kind == "classification" and t.num_labels == 2 for t in tasks)
        kernels = {}
        for lab, n, t in zip(labels, names, tasks):
            set_adapter(model, n)  # task t's fine-tuned weights and head
            kernels[lab] = empirical_ntk(model, probe, collator=t.collator, kinds=_kinds(args.kinds, cfgs[0]),
                                         output="margin" if binary else "logits", chunk_size=args.chunk_size).kernel
    report = similarity_report(vectors, kernels)
    os.makedirs(args.out, exist_ok=True)
    plot_heatmap(torch.tensor(report["cosine"]), os.path.join(args.out, "task_vector_cosine.png"),
                 title="cos(τ_s, τ_t)", labels=labels)
    if kernels:
        plot_heatmap(torch.tensor(report["kernel_alignment"]), os.path.join(args.out, "kernel_alignment.png"),
                     title="NTK alignment", labels=labels)
    classify = [i for i, t in enumerate(tasks) if t.kind == "classification" and t.evals]
    if args.eval_n and classify:
        evals = {i: _examples(next(iter(tasks[i].evals.values())), args.eval_n) for i in classify}

        def task_accuracy(m, i):  # θ₀ (+ applied task vectors) with task i's head
            with _heads_only(m, names[i]):
                return accuracy(m, evals[i], tasks[i].collator)

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
            set_adapter(model, names[i])
            accs[labels[i]]["fine_tuned"] = accuracy(model, evals[i], tasks[i].collator)
        report["accuracy"] = accs
        plot_lines({"mean accuracy": (list(search["scores"]), list(search["scores"].values()))},
                   os.path.join(args.out, "coefficient.png"), title="θ₀ + λ Σ τ_t on validation", xlabel="λ")
    write_json(os.path.join(args.out, "task_vectors.json"), report)
    _print({k: report[k] for k in ("names", "cosine")} | (
        {"coef": report["coefficient_search"]["coef"]} if "coefficient_search" in report else {}))
    return 0


def geometric_grid(n_min: int, n_max: int, points: int) -> list[int]:
    if not 0 < n_min <= n_max or points < 2:
        raise AnalysisError(f"--grid: need 0 < n_min <= n_max and >= 2 points, got {n_min}:{n_max}:{points}")
    r = (n_max / n_min) ** (1 / (points - 1))
    return sorted({int(round(n_min * r ** i)) for i in range(points)})


def fit_slope(ns, errors) -> float:
    """Least-squares slope of log(error) on log(n) (errors ≤ 0 are skipped)."""
    pts = [(math.log(n), math.log(e)) for n, e in zip(ns, errors) if e > 0]
    if len(pts) < 2:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den > 0 else math.nan


def cmd_samples(args) -> int:
    from ..config import build_config
    from ..train import train  # the one analysis that trains
    from .ntk import empirical_ntk, rate_from_decay
    from .plots import plot_lines, write_json

    cfg = _config(args.config, args.overrides)
    ns = [int(n) for n in args.ns.split(",")] if args.ns else geometric_grid(*[int(v) for v in args.grid.split(":")])
    runs = []
    for n in ns:
        run_cfg = build_config({**cfg.to_dict(), "max_train_samples": n,
                                "output_dir": os.path.join(args.out, f"n{n}")})
        metrics = train(run_cfg)
        key = next((k for k in ("eval_accuracy", "eval_pearson", "eval_matthews_correlation") if k in metrics), None)
        err = 1.0 - metrics[key] if key else metrics.get("eval_loss", math.nan)
        runs.append({"n": n, "error": err, "metric": key or "eval_loss", "metrics": metrics})
    slope = fit_slope(ns, [r["error"] for r in runs])
    model, tok, task = _load(cfg, args.kernel_n or max(ns))
    res = empirical_ntk(model, _examples(task.train, args.kernel_n or max(ns)), collator=task.collator,
                        kinds=_kinds(args.kinds, cfg), layers=cfg.layers, output=_output(task, None),
                        label_token_ids=_label_ids(tok, task, args.label_words), chunk_size=args.chunk_size)
    out = {"ns": ns, "runs": runs, "error_slope": slope, "kernel_decay_exponent": res.decay_exponent,
           "kernel_rate": -rate_from_decay(res.decay_exponent), "kernel_n": len(res.kernel),
           "note": "kernel_rate is the excess-risk exponent n^(-p/(p+1)) from λ_i ~ i^(-p); error_slope fits the raw "
                   "error, which also holds the irreducible part"}
    os.makedirs(args.out, exist_ok=True)
    write_json(os.path.join(args.out, "samples.json"), out)
    e0 = runs[0]["error"]
    series = {"error": (ns, [r["error"] for r in runs])}
    if slope == slope:
        series[f"fit slope {slope:.2f}"] = (ns, [e0 * (n / ns[0]) ** slope for n in ns])
    if out["kernel_rate"] == out["kernel_rate"]:
        series[f"kernel rate {out['kernel_rate']:.2f}"] = (ns, [e0 * (n / ns[0]) ** out["kernel_rate"] for n in ns])
    plot_lines(series, os.path.join(args.out, "samples.png"), title="error vs training examples", xlabel="n",
               ylabel="error", log="xy")
    _print({k: out[k] for k in ("ns", "error_slope", "kernel_rate")})
    return 0


# --- parser -----------------------------------------------------------------------------------------------

def _print(obj) -> None:
    from .plots import _jsonable

    print(json.dumps(_jsonable(obj), indent=2, sort_keys=True))


def _with_config(p):
    p.add_argument("config", nargs="?", help="run config YAML (optional) or the first key=value")
    p.add_argument("overrides", nargs="*", help="key=value as for train (model=..., task=..., data_dir=...)")


def _with_kernel(p, n_default: int = 256):
    p.add_argument("--n", type=int, default=n_default, help="training examples in the kernel")
    p.add_argument("--kinds", help="matrix kinds, e.g. v or q,k,v,o (default: the config's targets)")
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


def _guard(func):
    def run(args):
        _check(args)  # errors reach cli.main, which prints them in one line
        return func(args)
    return run


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
    p.set_defaults(func=_guard(cmd_ntk))

    p = sub.add_parser("stopping", help="predicted early-stopping step/epoch before training (RWY 2014)")
    _with_config(p)
    _with_kernel(p)
    p.add_argument("--sigma", type=float, help="noise level (default: estimated by kernel ridge + leave-one-out)")
    p.add_argument("--run", help="finished run folder: report its observed best step next to the prediction")
    p.set_defaults(func=_guard(cmd_stopping))

    p = sub.add_parser("subspace", help="φ(i, j) subspace similarity between two adapters (LoRA §7.2)")
    p.add_argument("adapter1")
    p.add_argument("adapter2")
    p.add_argument("--side", choices=["A", "B"], default="A")
    p.set_defaults(func=_guard(cmd_subspace))

    p = sub.add_parser("amplification", help="amplification factor and ΔW spectra of an adapter (LoRA §7.3)")
    p.add_argument("adapter")
    p.add_argument("--rank", type=int, help="r of the projection (default: the numerical rank of ΔW)")
    p.set_defaults(func=_guard(cmd_amplification))

    p = sub.add_parser("task-vectors", help="cosines, kernel alignment and a coefficient search for task vectors")
    p.add_argument("adapters", nargs="+", help="run folders of fine-tuned adapters (one base model)")
    p.add_argument("--kernel-n", type=int, default=0, help="examples per task in the shared kernel probe set")
    p.add_argument("--kinds", help="matrix kinds of the kernels (default: the first run's targets)")
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--eval-n", type=int, default=0, help="validation examples per task for the coefficient search")
    p.add_argument("--coefs", default="0,0.2,0.4,0.6,0.8,1.0,1.2", help="comma-separated λ values")
    p.set_defaults(func=_guard(cmd_task_vectors))

    p = sub.add_parser("samples", help="fine-tune on a geometric grid of n and fit the error-vs-n slope")
    _with_config(p)
    p.add_argument("--ns", help="comma-separated sizes, e.g. 64,128,256")
    p.add_argument("--grid", default="64:512:4", help="n_min:n_max:points (geometric)")
    p.add_argument("--kernel-n", type=int, help="examples in the kernel (default: the largest n)")
    p.add_argument("--kinds")
    p.add_argument("--label-words")
    p.add_argument("--chunk-size", type=int, default=16)
    p.set_defaults(func=_guard(cmd_samples))

    for action in sub.choices.values():
        action.add_argument("--out", required=True, help="folder for the JSON and PNG files")
    return parser
