"""SMT vs full fine-tuning vs qkvtune LoRA on SmolLM2-135M: step time, peak memory, trainable state.

    .venv/bin/python benchmarks/smt_memory.py            # all three, side by side, ~3-5 min on 2 CPU cores

Memory: each configuration runs alone in a fresh subprocess (``--config NAME``) so peaks never mix.
Peak memory is the process's resident-set high-water mark (VmHWM) from just after the model is loaded
to the last step — for SMT that includes its warm-up and selection; the mark is reset after loading
via ``/proc/self/clear_refs`` so the loading spike does not count (``ru_maxrss``, which cannot be
reset, is reported too). Time: one more subprocess (``--timing``) holds all three models and runs
their steps interleaved round-robin, so other load on a shared machine hits each alike; step time is
the median over the steps after the first ``--skip`` (the best step is reported too). Trainable state
is weights + gradients + two Adam moments of the trainable parameters, 4 bytes each (fp32).
Targets (from the SMT issue): SMT peak ≤ 0.75× full, SMT step ≤ 1.15× LoRA, SMT state ≤ 3% of full.
Writes ``benchmarks/results/smt_memory.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("full", "lora", "smt")
TARGETS = {"peak_smt_over_full": 0.75, "step_smt_over_lora": 1.15, "state_smt_over_full": 0.03}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        return True
    except OSError:
        return False


def _examples(tokenizer, n: int, batch: int, seq: int):
    """Real text with no download: CPython's own documentation topics, cut into seq-token rows."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = ids[: (len(ids) // seq) * seq].view(-1, seq)
    need = n * batch
    rows = rows.repeat((need + len(rows) - 1) // len(rows), 1)[:need]
    return [{"input_ids": r, "labels": r} for r in rows]


def _setup(config: str, model, examples, collate, args) -> dict:
    """Make ``model`` trainable as ``config`` says; for SMT run its warm-up and selection first."""
    from qkvtune import attach, smt
    from qkvtune.targets import find_targets

    info = {}
    if config == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    elif config == "lora":
        attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=8, alpha=16)
    else:
        t0 = time.perf_counter()
        out_dir = os.path.join(HERE, "results", "smt_memory_allocation")
        sel = smt.prepare_smt(model, examples, collate, batch_size=args.batch, warmup_steps=args.smt_warmup,
                              block_size=args.block_size, budget=args.budget, kinds=("q", "k", "v"), seed=0,
                              out_dir=out_dir, progress=False)
        attach.add_adapter(model, smt.targets_of(model, sel), "smt", block_size=args.block_size, blocks=sel)
        with open(os.path.join(out_dir, smt.REPORT_JSON)) as fh:
            report = json.load(fh)
        info.update(smt_blocks=len(sel), smt_by_kind=report["by_kind"], smt_warmup_steps=args.smt_warmup,
                    smt_warmup_s=round(time.perf_counter() - t0, 2))
    model.train()
    return info


def _step(model, opt, batch) -> tuple[float, float]:
    t = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t, loss.item()


def _load(args):
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from qkvtune.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m", "causal_lm", dtype="float32")
    examples = _examples(tokenizer, args.steps + args.smt_warmup, args.batch, args.seq)
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    train = [collate(examples[i * args.batch:(i + 1) * args.batch]) for i in range(args.steps)]
    return model, examples, collate, train


def _adamw(model):
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=1e-5), params


def run_memory(config: str, args) -> dict:
    """One configuration alone in this process: peak RSS from after loading to the last step."""
    import gc

    from qkvtune import smt
    from qkvtune.bench.speed import _status_kb

    model, examples, collate, train = _load(args)
    total = smt.count_parameters(model)
    gc.collect()
    reset_ok = _reset_peak()
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    info = {"config": config, **_setup(config, model, examples, collate, args)}
    setup_peak_kb = _status_kb("VmHWM")  # SMT: the warm-up and selection
    _reset_peak()
    opt, params = _adamw(model)
    times, losses = zip(*[_step(model, opt, b) for b in train[:args.memory_steps]])
    train_peak_kb = _status_kb("VmHWM")
    peak_kb = max(setup_peak_kb, train_peak_kb) if reset_ok else train_peak_kb
    n_train = sum(p.numel() for p in params)
    info.update(
        total_parameters=total, trainable_parameters=n_train,
        trainable_state_bytes=4 * n_train * params[0].element_size(),  # weights, grads, Adam m and v
        alone_step_s=[round(t, 3) for t in times], losses=[round(x, 4) for x in losses],
        run_s=round(time.perf_counter() - t0, 1), rss_after_load_mb=base_kb / 1024,
        peak_rss_mb=peak_kb / 1024, peak_over_load_mb=(peak_kb - base_kb) / 1024,
        peak_setup_mb=setup_peak_kb / 1024, peak_training_mb=train_peak_kb / 1024,
        ru_maxrss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_reset=reset_ok,
    )
    return info


def run_timing(args) -> dict:
    """All three in one process, steps interleaved round-robin, so background load hits each alike."""
    import copy

    model, examples, collate, train = _load(args)
    models = {"full": model, "lora": copy.deepcopy(model), "smt": copy.deepcopy(model)}
    info = {}
    for name, m in models.items():
        info[name] = _setup(name, m, examples, collate, args)
        info[name]["opt"] = _adamw(m)[0]
    times = {name: [] for name in CONFIGS}
    for i, batch in enumerate(train):
        order = CONFIGS[i % 3:] + CONFIGS[:i % 3]  # rotate who goes first
        for name in order:
            times[name].append(_step(models[name], info[name]["opt"], batch)[0])
    return {name: {"step_s": [round(t, 3) for t in times[name]],
                   "step_s_median": statistics.median(times[name][args.skip:]),
                   "step_s_min": min(times[name][args.skip:]),
                   **{k: v for k, v in info[name].items() if k != "opt"}} for name in CONFIGS}


def _child(args_list: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args_list], capture_output=True, text=True,
                          cwd=os.path.dirname(HERE))
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        sys.exit(f"{args_list[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", choices=CONFIGS, help="(internal) memory run of one configuration")
    ap.add_argument("--timing", action="store_true", help="(internal) interleaved timing run")
    ap.add_argument("--steps", type=int, default=8, help="timed training steps per configuration")
    ap.add_argument("--skip", type=int, default=2, help="first steps left out of the median")
    ap.add_argument("--memory-steps", type=int, default=3, help="training steps in each memory run")
    ap.add_argument("--smt-warmup", type=int, default=4, help="SMT warm-up (gradient-sum) steps")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "smt_memory.json"))
    args = ap.parse_args()
    if args.config or args.timing:
        result = run_memory(args.config, args) if args.config else run_timing(args)
        print("RESULT " + json.dumps(result), flush=True)
        return

    # Parent: fresh processes, one at a time — a memory run per configuration, then one timing run.
    forwarded = [a for a in sys.argv[1:] if not a.startswith("--out")]
    results = {}
    for config in CONFIGS:
        print(f"memory run: {config} ...", flush=True)
        results[config] = _child(["--config", config, *forwarded])
    print("timing run: full, LoRA and SMT interleaved ...", flush=True)
    timing = _child(["--timing", *forwarded])
    for config in CONFIGS:
        results[config].update({k: timing[config][k] for k in ("step_s", "step_s_median", "step_s_min")})

    f, lo, s = results["full"], results["lora"], results["smt"]
    ratios = {
        "peak_smt_over_full": s["peak_rss_mb"] / f["peak_rss_mb"],
        "peak_over_load_smt_over_full": s["peak_over_load_mb"] / f["peak_over_load_mb"],
        "peak_smt_over_lora": s["peak_rss_mb"] / lo["peak_rss_mb"],
        "step_smt_over_lora": s["step_s_median"] / lo["step_s_median"],
        "step_smt_over_lora_min": s["step_s_min"] / lo["step_s_min"],
        "step_smt_over_full": s["step_s_median"] / f["step_s_median"],
        "state_smt_over_full": s["trainable_state_bytes"] / f["trainable_state_bytes"],
    }
    print(f"\nSmolLM2-135M, batch {args.batch}×{args.seq}, fp32, {args.threads} threads, AdamW. Step time: "
          f"median of steps {args.skip + 1}..{args.steps}, the three interleaved in one process. "
          f"SMT: b={args.block_size}, budget {args.budget:g}, {args.smt_warmup} warm-up steps.")
    print(f"{'':26}{'full':>12}{'LoRA q,v r=8':>14}{'SMT':>12}")
    row = lambda name, fn: print(f"{name:26}" + "".join(fn(r).rjust(w) for r, w in ((f, 12), (lo, 14), (s, 12))))
    row("step time, median (s)", lambda r: f"{r['step_s_median']:.3f}")
    row("step time, best (s)", lambda r: f"{r['step_s_min']:.3f}")
    row("peak RSS (MB)", lambda r: f"{r['peak_rss_mb']:.0f}")
    row("peak above loaded (MB)", lambda r: f"{r['peak_over_load_mb']:.0f}")
    row("  peak in warm-up (MB)", lambda r: f"{r['peak_setup_mb']:.0f}" if "smt_blocks" in r else "-")
    row("  peak in training (MB)", lambda r: f"{r['peak_training_mb']:.0f}")
    row("trainable params", lambda r: f"{r['trainable_parameters']:,d}")
    row("trainable state (MB)", lambda r: f"{r['trainable_state_bytes'] / 2**20:,.1f}")
    print(f"SMT warm-up + selection: {s['smt_warmup_s']} s for {s['smt_warmup_steps']} steps (memory run); "
          f"{s['smt_blocks']} blocks, by kind {s['smt_by_kind']}")
    for key, value in ratios.items():
        target = TARGETS.get(key)
        verdict = "" if target is None else f"  (target ≤ {target:g}: {'met' if value <= target else 'NOT met'})"
        print(f"  {key:30} {value:.3f}{verdict}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"args": vars(args), "results": results, "ratios": ratios, "targets": TARGETS}, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
