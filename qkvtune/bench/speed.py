"""``qkvtune bench speed``: step time, tokens/s and peak memory of qkvtune next to PEFT, full fine-tuning
and the bare model, all measured in one process.

Every configuration gets its own copy of the model. Rounds interleave the configurations (one step of
each per round, the order rotated every round) so machine noise hits all alike; figures are medians
over rounds, printed as ratios to their baseline and to two units:

* × fwd: the step over a train-mode forward of the bare model (eager, under no_grad, loss included);
* × floor: the step over the matrix work it cannot avoid, k eval-mode forwards (dropout-free): a step
  that trains adapters or a slice (LoRA, dense, SMT) needs the forward and the input gradients, k = 2;
  full fine-tuning also the weight gradients, k = 3; inference k = 1. On models with dropout the
  train-mode forward also pays for random numbers, so × fwd < × floor there.

Peak memory: on CPU (``--memory``) the peak RSS of a fresh subprocess per configuration, counted from
after the configuration is built (``/proc/self/clear_refs``) to its last step, so the RSS of its own
model (the unit's is the base), optimizer state and activations; on CUDA ``torch.cuda.max_memory_allocated``
with each configuration alone on the device, reset before its steps.

Devices: fp32 on CPU (bf16 is slower there), bf16 weights under bf16 autocast on CUDA. The fast path
(``qkvtune.fastpath``): the cheap dropout masks on CPU, ``torch.compile`` on CUDA; ``--fast-path both``
reports eager qkvtune and fast qkvtune, each against eager PEFT.

    qkvtune bench speed --model all --rounds 15 --memory
    qkvtune bench speed --model smollm2-135m --device cuda
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import time

import torch

from ..errors import QkvtuneError, check_output_dir
from .harness import (LORA, SMT_BLOCK, SMT_BUDGET, adapt, in_fresh_process, load_base, make_batch, peak_rss_from_now,
                      peft_lora)

SHAPES = {"minilm": (16, 128), "smollm2-135m": (4, 128)}
# merged-forward: merge, then unwrap (PEFT's merge_and_unload, what `qkvtune export` writes): the deployed model;
# merged-wrapped keeps the wrappers (merged weights, a Python call per projection); unmerged adds the LoRA path
INFER = ["base-forward", "merged-forward", "merged-wrapped-forward", "unmerged-forward", "peft-unmerged-forward"]
TRAIN = ["full", "peft-lora-qv", "qkvtune-lora-qv", "peft-lora-qkv", "qkvtune-lora-qkv", "qkvtune-dense-qv",
         "qkvtune-smt"]
FAST = ["fast-qkvtune-lora-qv", "fast-qkvtune-lora-qkv"]
FAST_INFER = ["fast-base-forward", "fast-unmerged-forward"]  # CUDA: both compiled, so the ratio is like for like
UNIT = "forward-train"
FLOOR_FORWARDS = {"full": 3, "forward-train": 1, **{c: 1 for c in INFER}}  # everything else trains adapters: 2
# (configuration, baseline, time target, memory target); None: reported, no target
RATIOS = [("qkvtune-lora-qv", "peft-lora-qv", 1.0, 1.0), ("qkvtune-lora-qkv", "peft-lora-qkv", 1.0, 1.0),
          ("fast-qkvtune-lora-qv", "peft-lora-qv", 0.80, None), ("fast-qkvtune-lora-qkv", "peft-lora-qkv", 0.80, None),
          ("merged-forward", "base-forward", 1.02, None), ("merged-wrapped-forward", "base-forward", None, None),
          ("unmerged-forward", "base-forward", 1.05, None), ("peft-unmerged-forward", "base-forward", None, None),
          ("unmerged-forward", "peft-unmerged-forward", 1.0, None), ("fast-unmerged-forward", "fast-base-forward", 1.05, None),
          ("qkvtune-dense-qv", "full", None, None), ("qkvtune-smt", "qkvtune-lora-qv", None, None),
          ("qkvtune-smt", "full", None, None)]


def configurations(fast_path: str) -> list[str]:
    return [UNIT] + INFER + TRAIN + (FAST + FAST_INFER if fast_path in ("on", "both") else [])


def _inference(config: str) -> bool:
    return config.removeprefix("fast-") in INFER


def build(config: str, base, task, device: str):
    """(model, optimizer or None) for one configuration; the base model itself serves the bare forwards."""
    from .. import attach, fastpath
    from ..targets import find_targets

    if config == UNIT:
        return base.train(), None
    model = copy.deepcopy(base)
    heads = attach.find_heads(model, base.qkvtune_new_modules)
    name = config.removeprefix("fast-")
    if name == "full":
        adapt(model, "full", heads)
    elif name.startswith("peft-lora"):
        model = peft_lora(model, name.rsplit("-", 1)[1], task)
    elif name.startswith("qkvtune-"):  # qkvtune-<method>[-<kinds>]
        _, method, *kinds = name.split("-")
        adapt(model, method, heads, *kinds)
    elif name in ("merged-forward", "merged-wrapped-forward", "unmerged-forward"):
        attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", heads=[], **LORA)
        with torch.no_grad():
            for _, d in attach.iter_deltas(model):
                d.factors()[1].normal_(0, 0.02)  # a trained-looking adapter (B = 0 would add nothing)
        if name == "merged-wrapped-forward":
            attach.merge_adapter(model)
        elif name == "merged-forward":
            model = attach.unwrap(model)
    elif name == "peft-unmerged-forward":
        model = peft_lora(model, "qv")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02)
    if config.startswith("fast-"):
        fastpath.enable(model, compile=device == "cuda")
    if _inference(config):
        return model.eval(), None
    model.train()
    return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)


def step(config: str, model, opt, batch, device: str) -> None:
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        if _inference(config):
            with torch.inference_mode():
                model(**{k: v for k, v in batch.items() if k != "labels"})
        elif opt is None:  # the unit: a train-mode forward with its loss
            with torch.no_grad():
                model(**batch)
        else:
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(name: str, configs: list[str], rounds: int, warmup: int, device: str, batch: int, seq: int,
            progress: bool = True) -> dict:
    """Interleaved step times: {config: [seconds per step, one per round]}."""
    from tqdm.auto import tqdm

    base, task, tokenizer = load_base(name, device)
    inputs = make_batch(tokenizer, task, batch, seq, device)
    built = {}
    for c in tqdm(configs, desc=f"{name}: building", disable=not progress):
        built[c] = build(c, base, task, device)
    times = {c: [] for c in configs}
    for r in tqdm(range(warmup + rounds), desc=f"{name}: rounds ({warmup} warm-up)", disable=not progress):
        order = configs[r % len(configs):] + configs[:r % len(configs)]  # rotate who goes first
        for c in order:
            model, opt = built[c]
            _sync(device)
            t = time.perf_counter()
            step(c, model, opt, inputs, device)
            _sync(device)
            if r >= warmup:
                times[c].append(time.perf_counter() - t)
    return times


def cuda_peaks(name: str, configs: list[str], batch: int, seq: int, steps: int = 2) -> dict:
    """max_memory_allocated (MB) of each configuration alone on the device, reset before each."""
    base, task, tokenizer = load_base(name, "cuda")
    inputs = make_batch(tokenizer, task, batch, seq, "cuda")
    peaks = {}
    for c in configs:
        model, opt = build(c, base, task, "cuda")
        if model is not base:  # the configuration alone on the device
            base.to("cpu")
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step(c, model, opt, inputs, "cuda")
        torch.cuda.synchronize()
        peaks[c] = torch.cuda.max_memory_allocated() / 2**20
        del model, opt
        base.to("cuda")
    return peaks


def memory_child(name: str, config: str, batch: int, seq: int, steps: int = 3) -> None:
    """(Run in a fresh process) peak RSS in MB from after building the configuration to its last step, printed."""
    import gc

    torch.set_num_threads(2)
    torch.manual_seed(0)
    base, task, tokenizer = load_base(name, "cpu")
    inputs = make_batch(tokenizer, task, batch, seq, "cpu")
    model, opt = build(config, base, task, "cpu")
    del base  # every configuration but the unit trains its own copy: the configuration alone
    gc.collect()
    peak = peak_rss_from_now()
    for _ in range(steps):
        step(config, model, opt, inputs, "cpu")
    print("RESULT " + json.dumps({"peak_mb": peak()}))


def cpu_peak(name: str, config: str, batch: int, seq: int) -> float:
    out = in_fresh_process(f"from qkvtune.bench.speed import memory_child; "
                           f"memory_child({name!r}, {config!r}, {batch}, {seq})")
    return out.get("peak_mb", float("nan"))


def summarise(times: dict, tokens: int) -> dict:
    med = {c: statistics.median(v) for c, v in times.items()}
    eval_fwd, train_fwd = med.get("base-forward"), med.get(UNIT)
    out = {}
    for c, v in times.items():
        k = FLOOR_FORWARDS.get(c.removeprefix("fast-"), 2)
        out[c] = {"median_s": med[c], "tokens_per_s": tokens / med[c],
                  "x_forward": med[c] / train_fwd if train_fwd else None,
                  "floor_forwards": k, "x_floor": med[c] / (k * eval_fwd) if eval_fwd else None,
                  "all_s": [round(t, 5) for t in v]}
    return out


def ratios(results: dict, peaks: dict | None) -> list[dict]:
    rows = []
    for a, b, t_target, m_target in RATIOS:
        if a not in results or b not in results:
            continue
        t = results[a]["median_s"] / results[b]["median_s"]
        m = peaks[a] / peaks[b] if peaks and a in peaks and b in peaks else None
        rows.append({"ratio": f"{a} / {b}", "time": t, "time_target": t_target,
                     "time_met": None if t_target is None else t <= t_target,
                     "memory": m, "memory_target": m_target,
                     "memory_met": None if m_target is None or m is None else m <= m_target})
    return rows


def _fmt(x, spec=".3f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def table(report: dict) -> str:
    b, s = report["shape"]
    lines = [f"## {report['model']} {b}×{s}, {report['device']} {report['dtype']}, "
             f"{report['threads']} threads, median of {report['rounds']} interleaved rounds",
             *([f"({report['note']})"] if report.get("note") else []), "", "| configuration | median step (s) | tokens/s | × fwd | × floor (k) | peak memory (MB) |",
             "|---|---|---|---|---|---|"]
    peaks = report.get("peak_mb") or {}
    for c, r in report["results"].items():
        lines.append(f"| {c} | {r['median_s']:.4f} | {r['tokens_per_s']:.0f} | {_fmt(r['x_forward'], '.2f')} | "
                     f"{_fmt(r['x_floor'], '.2f')} ({r['floor_forwards']}) | {_fmt(peaks.get(c), '.0f')} |")
    lines += ["", "| ratio | time | target | memory | target |", "|---|---|---|---|---|"]
    verdict = lambda met: "" if met is None else (" met" if met else " NOT met")
    for r in report["ratios"]:
        lines.append(f"| {r['ratio']} | {r['time']:.3f} | {_fmt(r['time_target'], '.2f')}{verdict(r['time_met'])} | "
                     f"{_fmt(r['memory'])} | {_fmt(r['memory_target'], '.2f')}{verdict(r['memory_met'])} |")
    return "\n".join(lines)


def run(args) -> int:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise QkvtuneError("--device: cuda, but no CUDA device is available")
    if device == "cpu":
        torch.set_num_threads(args.threads)
    names = list(SHAPES) if args.model == "all" else [args.model]
    configs = configurations(args.fast_path)
    if args.fast_path == "on":  # fast qkvtune against eager PEFT only
        configs = [c for c in configs if not c.startswith("qkvtune-lora")]
    if args.configs:  # a subset (its JSON gets its own name, so the full results stay)
        wanted = [c.strip() for c in args.configs.split(",")]
        unknown = [c for c in wanted if c not in configurations("both")]
        if unknown:
            raise QkvtuneError(f"--configs: unknown {unknown[0]!r} (known: {', '.join(configurations('both'))})")
        configs = [c for c in configurations("both") if c in wanted]
    check_output_dir(args.out, "--out")
    os.makedirs(args.out, exist_ok=True)
    for name in names:
        torch.manual_seed(0)
        batch, seq = SHAPES.get(name, (4, 16))
        batch, seq = args.batch or batch, args.seq or seq
        times = measure(name, configs, args.rounds, args.warmup, device, batch, seq, progress=not args.quiet)
        results = summarise(times, batch * seq)
        peaks = None
        if device == "cuda":
            peaks = cuda_peaks(name, configs, batch, seq)
        elif args.memory:
            peaks = {c: cpu_peak(name, c, batch, seq) for c in configs}
        import peft
        import transformers

        report = {"model": name, "device": device, "dtype": "bf16 autocast, bf16 weights" if device == "cuda" else "fp32",
                  "device_name": torch.cuda.get_device_name() if device == "cuda" else f"{os.cpu_count()} CPU cores",
                  "shape": [batch, seq], "threads": torch.get_num_threads(), "rounds": args.rounds,
                  "warmup": args.warmup, "fast_path": args.fast_path, "lora": LORA,
                  "smt": {"budget": SMT_BUDGET, "block_size": SMT_BLOCK, "selection": "fixed random (seed 0)"},
                  "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "peft": peft.__version__},
                  "date": time.strftime("%Y-%m-%d %H:%M"), "note": args.note, "results": results, "peak_mb": peaks}
        report["ratios"] = ratios(results, peaks)
        print(table(report), flush=True)
        safe = os.path.basename(os.path.normpath(name)) if name not in SHAPES else name
        path = os.path.join(args.out, f"speed_{safe}_{device}{'_subset' if args.configs else ''}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("speed", help="step time, tokens/s and peak memory against PEFT, full fine-tuning and the bare model",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="all", help="minilm | smollm2-135m | all, or any model name or folder")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (one step of each configuration per round)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--memory", action="store_true", help="CPU: peak RSS, one fresh subprocess per configuration")
    p.add_argument("--device", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--fast-path", default="both", choices=["on", "off", "both"],
                   help="on: fast qkvtune vs eager PEFT; off: eager only; both: eager and fast qkvtune")
    p.add_argument("--batch", type=int, help="batch size (default: 16 for minilm, 4 for smollm2-135m)")
    p.add_argument("--seq", type=int, help="sequence length (default 128)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"), help="folder for speed_<model>_<device>.json")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--configs", help="only these configurations, comma-separated (written to speed_<model>_<device>_subset.json)")
    p.add_argument("--note", default="", help="a remark stored in the JSON (e.g. how the weights were obtained)")
    p.set_defaults(func=run)
