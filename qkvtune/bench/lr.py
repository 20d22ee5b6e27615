"""``qkvtune bench lr`` — how good is ``lr: auto``, measured against a real grid and the rules practitioners use.

For each setting of a matrix where the best rate moves (method, rank, task, model), the real grid: every rate of a
log-spaced ladder × every seed, each an ordinary run cached by its settings (``runner.ensure_run``), scored on the
test split (a language model: its validation loss, lower is better). Each rule then picks a rate and is trained at
it on every seed:
- ``auto``: ``lr: auto`` itself (each seed probes and trains at its own rate);
- fixed 1e-4, 2e-4, 5e-4 (qkvtune's default; ``lr: auto`` replaces it once it meets its targets), 1e-3;
- "10× full fine-tuning": 10 × 2e-5 (BERT's and most small models' full fine-tuning rate) for a low-rank update,
  the full fine-tuning rate itself for a dense ΔW or SMT's blocks (they are full fine-tuning on their entries);
- ``range test``: Smith's LR range test (one run at exponentially rising rates, 10⁻⁷ → 1 over ``RANGE_STEPS``
  steps; the rate of steepest descent of the smoothed loss), the probe-based peer.
A rule's regret is the grid's best mean (over seeds) minus the rule's mean, in the task's metric (a loss: as a
fraction of the best); the noise of the grid's best is the standard error of its 2-seed mean, and a regret within
it is not counted against anyone. A run collapsed when it predicts one class for every test example (a
regressor: Pearson ≤ 0.05), or, for a language model, when its validation loss is at or above the pretrained
model's.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time

FFT_RATE = 2e-5  # full fine-tuning's rate for "10× full fine-tuning" (BERT: 2e-5 – 5e-5; LoRA Without Regret: ×10)
FIXED = (1e-4, 2e-4, 5e-4, 1e-3)
RANGE_STEPS = 100
RANGE = (1e-7, 1.0)

GLUE = {"model": "minilm", "pooling": "mean", "max_length": 128, "batch_size": 16, "warmup_ratio": 0.06,
        "val_size": 200, "max_eval_samples": None, "eval_strategy": "steps", "logging_steps": 20, "patience": 2,
        "save_total_limit": 2}
SMALL = {"max_train_samples": 1000, "max_steps": 60, "eval_steps": 15}     # SST-2: learns at ×1 (claims suite)
LARGER = {"max_train_samples": 2000, "max_steps": 120, "eval_steps": 30}   # STS-B, MRPC: the ×2 budget
LORA = {"method": "lora", "rank": 8, "alpha": 16, "targets": ["q", "v"]}
SFT = {"model": "smollm2-135m", "as_chat": True, "max_train_samples": 200, "val_size": 24, "max_eval_samples": 48,
       "max_length": 128, "batch_size": 4, "eval_batch_size": 4, "warmup_ratio": 0.06, "max_steps": 20,
       "eval_strategy": "steps", "eval_steps": 10, "save_total_limit": 2, "logging_steps": 5}  # ~1 min a run
LOW = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)     # a low-rank update's ladder (half-decades)
FULL = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)    # a dense ΔW's and SMT's
SETTINGS = {  # name -> (task id, run settings, ladder)
    "sst2 LoRA r8": ("glue/sst2", {**GLUE, **SMALL, **LORA}, LOW),
    "sst2 LoRA r64": ("glue/sst2", {**GLUE, **SMALL, **LORA, "rank": 64}, LOW),
    "sst2 DoRA r8": ("glue/sst2", {**GLUE, **SMALL, **LORA, "method": "dora"}, LOW),
    "sst2 dense": ("glue/sst2", {**GLUE, **SMALL, "method": "dense", "targets": ["q", "v"]}, FULL),
    "sst2 SMT": ("glue/sst2", {**GLUE, **SMALL, "method": "smt", "block_size": 32, "smt_budget": 72,
                               "smt_warmup_steps": 20, "smt_warmup_lr": 0.1}, FULL),
    "stsb LoRA r8": ("glue/stsb", {**GLUE, **LARGER, **LORA}, LOW),
    "mrpc LoRA r8": ("glue/mrpc", {**GLUE, **LARGER, **LORA}, LOW),
    "sft LoRA r16": ("sft/alpaca_data_1k.json", {**SFT, "method": "lora", "rank": 16, "alpha": 32,
                                                "targets": ["all-linear"]}, LOW),
}


EDGE_BOUNDS = (1e-6, 3e-2)  # the grid extends past an edge no further than these


def beyond_edge(grid: dict, higher: bool) -> list[float]:
    """The next half-decade past the grid's edge where its best mean sits (within ``EDGE_BOUNDS``), else none."""
    sign = 1 if higher else -1
    rates = sorted(float(k) for k in grid)
    best = max(rates, key=lambda r: sign * grid[f"{r:g}"]["mean"])
    half = round(2 * math.log10(best))  # in half-decades: 1, 3, 10, 30 … ·10^k
    k = half + 1 if best == rates[-1] else half - 1 if best == rates[0] else None
    nxt = None if k is None else float(f"{(1 if k % 2 == 0 else 3) * 10 ** (k // 2):g}")
    return [nxt] if nxt is not None and EDGE_BOUNDS[0] <= nxt <= EDGE_BOUNDS[1] and f"{nxt:g}" not in grid else []


def low_rank(settings: dict) -> bool:
    return settings.get("method", "lora") in ("lora", "rslora", "dora")


def rules(settings: dict) -> dict[str, float | None]:
    """Each fixed rule's rate for a setting (auto and the range test are found per seed)."""
    out = {f"fixed {r:g}": r for r in FIXED}
    out["10x full FT"] = 10 * FFT_RATE if low_rank(settings) else FFT_RATE
    return out


def range_test(settings: dict, log=print, out_dir: str | None = None) -> dict:
    """Smith's LR range test on the setting's model, method and data: ``RANGE_STEPS`` real steps at rates rising
    exponentially over ``RANGE``; the loss smoothed (β = 0.98, bias-corrected) until it passes 4× its minimum; the
    rate is where the smoothed loss falls fastest per log-rate (fastai's "steep" suggestion)."""
    from dataclasses import replace

    from ..config import build_config
    from ..runs import build
    from ..trainer import QkvTrainer, training_arguments
    from .. import chunked_loss

    t0 = time.perf_counter()
    out_dir = out_dir or tempfile.mkdtemp(prefix="qkvtune-range-test-")  # SMT's warm-up writes its selection there
    cfg = build_config({**settings, "lr": 1.0, "output_dir": out_dir, "overwrite": True})
    run = build(cfg)
    probe = replace(cfg, warmup_ratio=0.0, eval_strategy="no", report_to="none")
    args = training_arguments(probe, run.task, "loss", False, has_eval=False)
    trainer = QkvTrainer(model=run.model, args=args, train_dataset=run.task.train, data_collator=run.task.collator,
                         rates=probe,
                         lm_loss=chunked_loss.for_run(run.model, cfg.chunked_loss, run.task))
    opt = trainer.create_optimizer()
    base = [g["lr"] for g in opt.param_groups]  # each group's rate at η_Q = 1
    loader = trainer.get_train_dataloader()
    it = iter(loader)
    rates, smooth, avg = [], [], 0.0
    lo, hi = RANGE
    run.model.train()
    for t in range(RANGE_STEPS):
        lr = lo * (hi / lo) ** (t / (RANGE_STEPS - 1))
        for g, b in zip(opt.param_groups, base):
            g["lr"] = b * lr
        try:
            batch = next(it)
        except StopIteration:
            it = iter(loader)
            batch = next(it)
        batch = {k: v.to(args.device) if hasattr(v, "to") else v for k, v in batch.items()}
        loss = trainer.compute_loss(run.model, batch)
        if not math.isfinite(float(loss)):
            break
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        avg = 0.98 * avg + 0.02 * float(loss)
        s = avg / (1 - 0.98 ** (t + 1))
        rates.append(lr)
        smooth.append(s)
        if s > 4 * min(smooth):
            break
    # steepest descent per log-rate, before the minimum of the smoothed loss
    end = smooth.index(min(smooth)) + 1
    slopes = [(smooth[i + 1] - smooth[i - 1]) / math.log(rates[i + 1] / rates[i - 1]) for i in range(1, end - 1)]
    pick = rates[1 + slopes.index(min(slopes))] if slopes else rates[max(0, end - 1)]
    seconds = time.perf_counter() - t0
    log(f"range test: steepest at {pick:.3g} (minimum at {rates[end - 1]:.3g}; {len(rates)} steps, {seconds:.0f} s)")
    return {"lr": float(f"{pick:.3g}"), "min_at": rates[end - 1], "steps": len(rates), "seconds": seconds,
            "curve": [[float(f"{r:.4g}"), round(v, 5)] for r, v in zip(rates, smooth)]}


def collapsed(run, pretrained_loss: float | None) -> bool:
    """At the constant predictor (one class for every test example; a regressor's Pearson ≤ 0.05), or a language
    model's validation loss at or above the pretrained model's."""
    if not math.isfinite(run.score):
        return True
    if pretrained_loss is not None:
        return not run.val_score < pretrained_loss
    pred = run.predictions()
    if pred is None:
        return False
    values = [p for p in pred["predictions"] if p is not None]
    if values and all(isinstance(p, int) for p in values):
        return len(set(values)) <= 1
    return run.score <= 0.05


def measure(names: list[str], seeds: list[int], data_dir: str, out: str, log=print, done=None) -> list[dict]:
    """Every setting's grid and rules; ``done(results)`` after each setting (the report so far)."""
    from ..autolr import VERSION
    from .runner import ensure_run, run_dir
    from .scores import higher_better
    from .suite import task_settings

    from ..data.sources import resolve_data_dir

    data_dir = resolve_data_dir(data_dir)
    results = []
    for name in names:
        task, settings, ladder = SETTINGS[name]
        higher = higher_better(task)
        base = {**task_settings(task, data_dir), **settings, **({"data_dir": data_dir} if data_dir else {})}
        label = task.replace("/", "-").replace(".", "-")
        pretrained_loss = None

        def train(lr, seed, arm):
            s = {**base, "lr": lr, "seed": seed}  # an auto run's folder also names the rule's version
            key = {**s, "lr_rule": VERSION} if lr == "auto" else s
            return ensure_run(s, run_dir(out, key, f"{label}-s{seed}"), arm, log, task=task)

        record = {"setting": name, "task": task, "higher_better": higher, "ladder": list(ladder), "seeds": seeds,
                  "bound": regret_bound(task),
                  "grid": {}, "rules": {}}
        rates = list(ladder)
        while rates:  # the ladder, then half-decades past an edge where the best mean sits, until it is interior
            lr = rates.pop(0)
            runs = [train(lr, seed, "grid") for seed in seeds]
            if not higher and pretrained_loss is None:
                from .measures import without_delta

                pretrained_loss = without_delta(runs[0])["val_score"]
                record["pretrained_val_loss"] = pretrained_loss
            record["grid"][f"{lr:g}"] = summary(runs, pretrained_loss, lr)
            if not rates:
                rates = beyond_edge(record["grid"], higher)
        for rule, lr in rules(settings).items():
            record["rules"][rule] = summary([train(lr, seed, rule) for seed in seeds], pretrained_loss, lr)
        autos = [train("auto", seed, "auto") for seed in seeds]
        record["rules"]["auto"] = summary(autos, pretrained_loss, None)
        probes = []
        for r in autos:
            with open(os.path.join(r.dir, "config.yaml")) as f:
                import yaml

                probes.append(yaml.safe_load(f).get("lr_auto") or {})
        record["rules"]["auto"]["rates"] = [p.get("lr") for p in probes]
        record["rules"]["auto"]["probe_seconds"] = [p.get("seconds") for p in probes]
        tests = []
        for seed in seeds:  # each range test kept in a folder named, as runs are, by a hash of its settings
            folder = run_dir(out, {**base, "seed": seed, "probe": "range test"}, f"range-{label}-s{seed}")
            path = os.path.join(folder, "range_test.json")
            if os.path.exists(path):
                with open(path) as f:
                    tests.append(json.load(f))
            else:
                from ..files import write_json

                tests.append(range_test({**base, "seed": seed}, log, out_dir=folder))
                write_json(path, tests[-1])
        rt = [train(t["lr"], seed, "range test") for t, seed in zip(tests, seeds)]
        record["rules"]["range test"] = summary(rt, pretrained_loss, None)
        record["rules"]["range test"]["rates"] = [t["lr"] for t in tests]
        record["rules"]["range test"]["probe_seconds"] = [t["seconds"] for t in tests]
        judge(record)
        record["auto_per_seed"] = per_seed(record)
        results.append(record)
        if done is not None:
            done(results)
        log(f"{name}: grid best {record['best_rate']:g} ({record['best']:.4f} ± {record['noise']:.4f}); auto "
            f"{record['rules']['auto']['rates']} regret {record['rules']['auto']['regret']:+.4f}")
    return results


def summary(runs: list, pretrained_loss: float | None, lr: float | None) -> dict:
    scores = [r.score for r in runs]  # the test split (a language model: its test loss)
    return {"lr": lr, "scores": scores, "mean": statistics.fmean(scores),
            "collapsed": [collapsed(r, pretrained_loss) for r in runs], "seconds": [r.seconds for r in runs]}


def judge(record: dict) -> None:
    """The grid's best (mean over seeds), its noise (standard error of a 2-seed mean: |a − b|/2, generally s/√n),
    and each rule's regret: raw, and beyond that noise (a loss: relative to the best)."""
    sign = 1 if record["higher_better"] else -1
    best_rate, best = max(record["grid"].items(), key=lambda kv: sign * kv[1]["mean"])
    scores = best["scores"]
    noise = statistics.stdev(scores) / math.sqrt(len(scores)) if len(scores) > 1 else 0.0
    record.update(best_rate=float(best_rate), best=best["mean"], noise=noise)
    for rule in record["rules"].values():
        regret = sign * (best["mean"] - rule["mean"])
        if not record["higher_better"]:  # a loss: as a fraction of the best
            regret, rule_noise = regret / best["mean"], noise / best["mean"]
        else:
            rule_noise = noise
        rule["regret"] = regret
        rule["regret_beyond_noise"] = max(0.0, regret - rule_noise)
        rates = rule.get("rates") or [rule["lr"]]
        g = math.exp(statistics.fmean(math.log(r) for r in rates))
        rule["log10_over_best"] = math.log10(g / float(best_rate))


def per_seed(record: dict) -> list[dict]:
    """Each seed's own best grid rate against the rate ``lr: auto`` chose on that seed (log10 of their ratio):
    whether the probe follows what a seed needs where the seeds' best rates differ (their fresh heads and adapters
    start differently), not only whether the pair's mean lands near the grid's best."""
    sign = 1 if record["higher_better"] else -1
    out = []
    for i, (seed, auto) in enumerate(zip(record["seeds"], record["rules"]["auto"]["rates"])):
        rate = float(max(record["grid"].items(), key=lambda kv: sign * kv[1]["scores"][i])[0])
        out.append({"seed": seed, "best_rate": rate, "auto_rate": auto,
                    "log10_gap": math.log10(auto / rate) if auto else math.nan})
    return out


def write_report(results: list[dict], path: str, command: str, seconds: float, pending: list[str] = ()) -> None:
    from ..files import write_json
    from .report import machine

    write_json(os.path.splitext(path)[0] + ".json", {"command": command, "seconds": seconds, "settings": results,
                                                     "not_yet_run": list(pending)})
    minutes = sum(compute_seconds(r) for r in results) / 60
    names = ["auto", "fixed 0.0001", "fixed 0.0002", "fixed 0.0005", "fixed 0.001", "10x full FT", "range test"]
    lines = ["# `lr: auto` against a real grid and the fixed rules", "", f"- command: `{command}`",
             f"- machine: {machine()}", f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; the whole "
             f"bench's invocation {seconds / 60:.1f} min (runs already in the run folder are read, not retrained); "
             f"its runs and range tests took {minutes:.1f} min as each was timed", "",
             "Regret = the grid's best mean over seeds − the rule's mean (accuracy, F1, Pearson: points of the "
             "metric; a language model's validation loss: as a fraction of the best). Noise = the standard error of "
             "the best grid point's 2-seed mean; a regret within it is not counted (the second figure). "
             "`collapsed`: a seed at the constant predictor or, for a language model, at or above the pretrained "
             "model's validation loss.", "",
             "| setting | grid best (rate) | noise | " + " | ".join(names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for r in results:
        cells = []
        for n in names:
            x = r["rules"][n]
            rate = "/".join(f"{v:.2g}" for v in (x.get("rates") or [x["lr"]]))
            flag = " **collapsed**" if any(x["collapsed"]) else ""
            cells.append(f"{x['regret']:+.4f} ({x['regret_beyond_noise']:.4f}) @ {rate}{flag}")
        lines.append(f"| {r['setting']} | {r['best']:.4f} ({r['best_rate']:g}) | {r['noise']:.4f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Grid (mean over seeds; the seeds' scores):", ""]
    for r in results:
        lines.append(f"- {r['setting']} ({r['task']}): " + "; ".join(
            f"{k}: {v['mean']:.4f} ({', '.join(f'{s:.3f}' for s in v['scores'])})"
            + (" collapsed" if any(v["collapsed"]) else "") for k, v in r["grid"].items()))
    lines += ["", "`lr: auto` per seed: each seed's own best grid rate, the rate auto chose on that seed, and "
              "log10 of their ratio (decades; + is above the seed's best):", ""]
    for r in results:
        lines.append(f"- {r['setting']}: " + "; ".join(
            f"seed {p['seed']}: best {p['best_rate']:g}, auto {p['auto_rate']:.2g} ({p['log10_gap']:+.2f})"
            for p in r["auto_per_seed"]))
    if pending:
        lines += ["", f"Not yet run when this report was written: {'; '.join(pending)}."]
    lines += ["", targets_section(results)]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    plot(results, os.path.splitext(path)[0] + ".png", names)


def regret_bound(task: str) -> float:
    """The issue's bound on auto's regret beyond noise: 1 point of accuracy or F1, 0.02 of a correlation, 1 % of a
    loss."""
    from ..data.families import main_metric

    metric = main_metric(task)
    return 0.02 if metric in ("pearson", "spearmanr", "matthews_correlation") else 0.01


def compute_seconds(record: dict) -> float:
    """Seconds of a setting's distinct runs (a rule at a grid rate is the grid's run) and its range tests."""
    seen, total = set(), 0.0
    for point in [*record["grid"].values(), *record["rules"].values()]:
        rates = point.get("rates") or [point["lr"]] * len(point["seconds"])
        for seed, (rate, sec) in enumerate(zip(rates, point["seconds"])):
            key = (rate if point.get("rates") is None else (id(point), rate), seed)
            if key not in seen:
                seen.add(key)
                total += sec
    return total + sum(x for x in record["rules"].get("range test", {}).get("probe_seconds") or [] if x)


def targets_section(results: list[dict]) -> str:
    """The issue's targets, each with its figure."""
    names = [n for n in results[0]["rules"]] if results else []
    auto = [r["rules"]["auto"] for r in results]
    never = not any(any(a["collapsed"]) for a in auto)
    within = sum(abs(a["log10_over_best"]) <= 0.5 + 1e-9 for a in auto)
    worst = {n: max(r["rules"][n]["regret_beyond_noise"] for r in results) for n in names}
    others = {n: v for n, v in worst.items() if n != "auto"}
    strict = all(worst["auto"] < v for v in others.values())
    ratios = []
    for r in results:
        a = r["rules"]["auto"]
        for probe, run in zip(a.get("probe_seconds") or [], a["seconds"]):
            if probe is not None and run:
                ratios.append(probe / max(1e-9, run - probe))
    cost = statistics.median(ratios) if ratios else math.nan
    bounded = all(r["rules"]["auto"]["regret_beyond_noise"] <= r.get("bound", 0.01) for r in results)
    lines = ["## Targets", "", "| target | measured | |", "|---|---|---|",
             f"| `lr: auto` never picks a collapsing rate | {sum(any(a['collapsed']) for a in auto)} of "
             f"{len(auto)} settings collapsed | {'met' if never else '**not met**'} |",
             f"| its rate within ×√10 of the grid's best in ≥ 90 % of settings | {within} of {len(auto)} "
             f"({100 * within / max(1, len(auto)):.0f} %) | {'met' if within >= 0.9 * len(auto) else '**not met**'} |",
             f"| its worst regret (beyond noise) strictly below every fixed rule's and the range test's | auto "
             f"{worst.get('auto', math.nan):.4f}; " + ", ".join(f"{n} {v:.4f}" for n, v in others.items())
             + f" | {'met' if strict else '**not met**'} |",
             "| its regret beyond the noise at most 1 point (accuracy, F1) / 0.02 (correlation) / 1 % (loss) in "
             "every setting | " + ", ".join(f"{r['setting']} {r['rules']['auto']['regret_beyond_noise']:.4f} "
                                            f"(≤ {r.get('bound', 0.01):g})" for r in results)
             + f" | {'met' if bounded else '**not met**'} |",
             f"| its cost ≤ 0.5 of one training run (median; probe seconds / the run's own seconds) | {cost:.2f} | "
             f"{'met' if cost <= 0.5 else '**not met**'} |"]
    return "\n".join(lines)


def plot(results: list[dict], path: str, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        ys = [r["rules"][n]["regret_beyond_noise"] for r in results]
        ax.bar([j + i * width for j in range(len(results))], ys, width, label=n)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(results))])
    ax.set_xticklabels([r["setting"] for r in results], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("regret beyond the seeds' noise")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_lr(args) -> int:
    import shlex
    import sys

    from ..config import ConfigError
    from .runner import open_output

    names = [n.strip() for n in args.settings.split(";")] if args.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise ConfigError(f"--settings: {unknown[0]!r} is not one of {list(SETTINGS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    report, log = open_output(args.out, args.report, "LR.md", "lr.log")
    t0 = time.perf_counter()
    command = "qkvtune " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    measure(names, seeds, args.data_dir, args.out, log,
            done=lambda results: write_report(results, report, command, time.perf_counter() - t0,
                                              pending=names[len(results):]))
    log(f"report: {report}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("lr", help="lr: auto against a real grid of rates and the fixed rules (regret per setting)")
    p.add_argument("--data-dir", help="folder laid out like shared/datasets (default: $QKVTUNE_DATA)")
    p.add_argument("--settings", help=f"settings separated by ';' (default: all: {'; '.join(SETTINGS)})")
    p.add_argument("--seeds", default="0,1", help="seeds of every grid point and rule")
    p.add_argument("--out", default="runs/bench-lr", help="folder for the runs, the log and the report")
    p.add_argument("--report", help="Markdown report path (default: OUT/LR.md); JSON and PNG beside it")
    p.set_defaults(func=cmd_lr)
