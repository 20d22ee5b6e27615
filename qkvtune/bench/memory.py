"""``qkvtune bench memory``: what gradient checkpointing and a 4-bit base save, next to PEFT's equivalents.

Each configuration runs in a fresh process: load the model (quantized at load time for nf4), attach the
adapter, then reset the peak-memory counter and take ``steps`` AdamW steps on one random batch. The peak is
what training holds: the (quantized) model, adapter, gradients, optimizer state, activations. CPU: the peak RSS
of the steps (``/proc/self/clear_refs`` resets the counter after loading, the weights made the process's own
memory and freed heap handed back first) less the RSS the process had with its libraries imported and no
model yet; CUDA: ``max_memory_allocated`` after a reset. The step time is the last step's. Everything is printed as a ratio to PEFT's eager LoRA-QV on the same shapes, and each
qkvtune configuration against PEFT's same configuration (PEFT's own gradient checkpointing and
``prepare_model_for_kbit_training`` on the same bitsandbytes base).

Targets (issue 11): checkpointing ≤ 0.6× the eager LoRA peak, nf4 + checkpointing ≤ 0.35×, and each
configuration no worse than PEFT's equivalent. The ``-chunked`` configurations add the chunked LM-head loss
(``chunked_loss``, issue 26: checkpointing ≤ 0.45×, nf4 + checkpointing ≤ 0.35× the eager LoRA peak).

    qkvtune bench memory                                   # SmolLM2 at 4×512 tokens, CPU
    qkvtune bench memory --model meta-llama/Llama-3.2-1B --device cuda
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import torch

from ..errors import QkvtuneError, check_output_dir
from .harness import in_fresh_process

# name -> (library, gradient checkpointing, quantize, method)
CONFIGS = {
    "peft-lora-qv": ("peft", False, None, "lora"),
    "peft-lora-qv-ckpt": ("peft", True, None, "lora"),
    "peft-lora-qv-nf4": ("peft", False, "nf4", "lora"),
    "peft-lora-qv-nf4-ckpt": ("peft", True, "nf4", "lora"),
    "lora-qv": ("qkvtune", False, None, "lora"),
    "lora-qv-ckpt": ("qkvtune", True, None, "lora"),
    "lora-qv-nf4": ("qkvtune", False, "nf4", "lora"),
    "lora-qv-nf4-ckpt": ("qkvtune", True, "nf4", "lora"),
    "full": ("qkvtune", False, None, "full"),
    "smt": ("qkvtune", False, None, "smt"),
    # chunked_loss (qkvtune/chunked_loss.py): the same runs without the full-vocabulary logits
    "lora-qv-chunked": ("qkvtune", False, None, "lora"),
    "lora-qv-ckpt-chunked": ("qkvtune", True, None, "lora"),
    "lora-qv-nf4-ckpt-chunked": ("qkvtune", True, "nf4", "lora"),
}
BASELINE = "peft-lora-qv"
# (configuration, reference, target on the peak ratio)
TARGETS = [("lora-qv-ckpt", "lora-qv", 0.6), ("lora-qv-nf4-ckpt", "lora-qv", 0.35),
           ("lora-qv", "peft-lora-qv", 1.0), ("lora-qv-ckpt", "peft-lora-qv-ckpt", 1.0),
           ("lora-qv-nf4", "peft-lora-qv-nf4", 1.0), ("lora-qv-nf4-ckpt", "peft-lora-qv-nf4-ckpt", 1.0),
           ("lora-qv-ckpt-chunked", "lora-qv", 0.45), ("lora-qv-nf4-ckpt-chunked", "lora-qv", 0.35)]  # issue 26


def _build(name: str, model_name: str, device: str):
    """(model in train mode, its task, tokenizer) for configuration ``name``."""
    from .. import attach
    from ..models import enable_checkpointing
    from .harness import adapt, load_base, peft_lora

    lib, ckpt, quantize, method = CONFIGS[name]
    model, task, tokenizer = load_base(model_name, device, quantize)
    new_modules = model.qkvtune_new_modules
    _resident(model)
    if lib == "peft":
        import peft

        if quantize:  # what PEFT's QLoRA recipe does: its own checkpointing set-up on the k-bit base
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        elif ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft_lora(model, "qv", task)
    else:
        if ckpt:
            enable_checkpointing(model)
        adapt(model, method, attach.find_heads(model, new_modules))
    return model.train(), task, tokenizer


@torch.no_grad()
def _resident(model) -> None:
    """Weights in the process's own memory, not pages of the memory-mapped checkpoint: a mapping stays in RSS
    for every page loading touched (all of them when quantizing), weights or not, as long as one tensor holds it."""
    from ..quant import is_quantized

    for module in model.modules():
        if not is_quantized(module):  # quantized layers were built in fresh memory already
            for p in module.parameters(recurse=False):
                p.data = p.data.clone()


def _trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def child(name: str, model_name: str, batch: int, seq: int, steps: int, device: str) -> None:
    """(Run in a fresh process) build one configuration, train ``steps`` steps, print its peak and step time."""
    import gc

    from .harness import make_batch, peak_rss_from_now, status_kb

    torch.set_num_threads(int(os.environ.get("QKVTUNE_BENCH_THREADS", "2")))
    torch.manual_seed(0)
    import importlib.util

    for lib in ("transformers", "peft", "bitsandbytes"):  # every configuration's libraries are resident alike
        if importlib.util.find_spec(lib):
            importlib.import_module(lib)
    libraries = status_kb("VmRSS") / 1024  # what the process holds before any tensor: not counted
    model, task, tokenizer = _build(name, model_name, device)
    inputs = make_batch(tokenizer, task, batch, seq, device)
    from ..chunked_loss import ChunkedLoss

    chunked = ChunkedLoss(model).active() if name.endswith("-chunked") else contextlib.nullcontext()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    gc.collect()
    _trim()  # hand back what loading freed (the full-precision weights of a quantized load): not training's
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        peak = lambda: torch.cuda.max_memory_allocated() / 2**20
    else:
        since = peak_rss_from_now()
        peak = lambda: since() - libraries
    seconds = []
    with chunked:
        for _ in range(steps):
            t = time.perf_counter()
            model(**inputs).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"peak_mb": peak(), "step_s": seconds[-1]}))


def measure(name: str, model_name: str, batch: int, seq: int, steps: int, device: str) -> dict:
    out = in_fresh_process("from qkvtune.bench.memory import child; "
                           f"child({name!r}, {model_name!r}, {batch}, {seq}, {steps}, {device!r})")
    return out if "error" not in out else {"peak_mb": float("nan"), "step_s": float("nan"), **out}


def report(results: dict) -> dict:
    base = results.get(BASELINE, {}).get("peak_mb", float("nan"))
    rows = [{"config": c, **r, "peak_vs_peft_lora": r["peak_mb"] / base} for c, r in results.items()]
    checks = []
    for c, ref, target in TARGETS:
        if c in results and ref in results:
            ratio = results[c]["peak_mb"] / results[ref]["peak_mb"]
            checks.append({"config": c, "reference": ref, "peak_ratio": ratio, "target": target,
                           "met": bool(ratio <= target),
                           "step_ratio": results[c]["step_s"] / results[ref]["step_s"]})
    return {"rows": rows, "checks": checks}


def table(rep: dict, header: str) -> str:
    lines = [header, "", "| configuration | peak MB | × PEFT LoRA-QV | step s |", "|---|---|---|---|"]
    for r in rep["rows"]:
        extra = f" ({r['error']})" if r.get("error") else ""
        lines.append(f"| {r['config']} | {r['peak_mb']:.0f} | {r['peak_vs_peft_lora']:.3f} | {r['step_s']:.2f}{extra} |")
    lines += ["", "| configuration | against | peak ratio | target | met | step ratio |", "|---|---|---|---|---|---|"]
    for c in rep["checks"]:
        lines.append(f"| {c['config']} | {c['reference']} | {c['peak_ratio']:.3f} | ≤ {c['target']} | "
                     f"{'yes' if c['met'] else 'NO'} | {c['step_ratio']:.2f} |")
    return "\n".join(lines)


def run(args) -> int:
    from tqdm.auto import tqdm

    if args.device == "cuda" and not torch.cuda.is_available():
        raise QkvtuneError("--device cuda: no CUDA device is available")
    configs = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise QkvtuneError(f"--configs: {unknown[0]!r} is not one of {', '.join(CONFIGS)}")
    if args.out:
        check_output_dir(args.out, "--out")
    results = {}
    for c in tqdm(configs, desc="bench memory (a fresh process each)"):
        results[c] = measure(c, args.model, args.batch, args.seq, args.steps, args.device)
    rep = report(results)
    header = (f"# qkvtune bench memory: {args.model}, {args.batch}×{args.seq} tokens, {args.steps} AdamW steps, "
              f"{args.device}, fp32 on CPU / bf16 on CUDA")
    text = table(rep, header)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "memory.json"), "w") as f:
            json.dump({"model": args.model, "batch": args.batch, "seq": args.seq, "device": args.device, **rep}, f,
                      indent=2)
        with open(os.path.join(args.out, "memory.md"), "w") as f:
            f.write(text + "\n")
    return 0


def register(sub) -> None:
    p = sub.add_parser("memory", help="peak memory of checkpointing and 4-bit bases, against PEFT (fresh process each)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(CONFIGS)}")
    p.add_argument("--out", default=None, help="folder for memory.json and memory.md")
    p.set_defaults(func=run)
