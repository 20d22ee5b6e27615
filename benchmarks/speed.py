"""Step time of qkvtune next to PEFT and full fine-tuning, measured side by side in one process.

Every configuration gets its own copy of the model; rounds interleave the configurations (one step of
each per round) so machine noise hits all alike, and medians are reported as ratios to their baseline
and to the physical floor, the forward pass (a LoRA step needs about two forwards of matrix work, full
fine-tuning about three). Peak memory needs a fresh process per configuration: ``--memory`` runs each
configuration alone in a subprocess and reads its peak RSS.

    python benchmarks/speed.py --model minilm            # 16×128
    python benchmarks/speed.py --model smollm2-135m      # 4×128
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from qkvtune import attach  # noqa: E402
from qkvtune.models import load_model  # noqa: E402
from qkvtune.targets import find_targets  # noqa: E402

SHAPES = {"minilm": (16, 128), "smollm2-135m": (4, 128)}
PEFT_NAMES = {"q": ["query", "q_proj"], "k": ["key", "k_proj"], "v": ["value", "v_proj"]}
TRAIN_CONFIGS = ["full", "peft-lora-qv", "qkvtune-lora-qv", "peft-lora-qkv", "qkvtune-lora-qkv", "qkvtune-dense-qv"]
INFER_CONFIGS = ["base-forward", "merged-forward", "unmerged-forward"]


def build(name: str, base, kind: str):
    """(model, optimizer or None) for one configuration."""
    model = copy.deepcopy(base)
    if name.startswith("peft-lora"):
        import peft

        kinds = "qkv" if name.endswith("qkv") else "qv"
        modules = [m for k in kinds for m in PEFT_NAMES[k]]
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=modules, lora_dropout=0.0,
                              task_type="SEQ_CLS" if kind == "classification" else "CAUSAL_LM")
        model = peft.get_peft_model(model, cfg)
    elif name.startswith("qkvtune"):
        kinds = list("qkv") if name.endswith("qkv") else ["q", "v"]
        method = "dense" if "dense" in name else "lora"
        hp = {} if method == "dense" else {"rank": 8, "alpha": 16}
        attach.add_adapter(model, find_targets(model, kinds), method, heads=attach.find_heads(model, ["classifier"]
                                                                                              if kind == "classification" else []), **hp)
    elif name in ("merged-forward", "unmerged-forward"):
        attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=8, alpha=16, heads=[])
        with torch.no_grad():
            for _, d in attach.iter_deltas(model):
                d.lora_B.normal_(0, 0.02)
        if name == "merged-forward":
            attach.merge_adapter(model)
    if name in INFER_CONFIGS:
        return model.eval(), None
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5)


def step(model, opt, batch) -> None:
    if opt is None:
        with torch.inference_mode():
            model(**{k: v for k, v in batch.items() if k != "labels"})
        return
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def make_batch(tokenizer, kind: str, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, min(tokenizer.vocab_size, 20000), (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["labels"] = torch.randint(0, 2, (batch,), generator=g) if kind == "classification" else ids.clone()
    return out


def measure(model_name: str, configs: list[str], rounds: int, warmup: int) -> dict:
    kind = "classification" if model_name == "minilm" else "causal_lm"
    base, tok, _ = load_model(model_name, kind, 2)
    batch = make_batch(tok, kind, *SHAPES[model_name])
    built = {c: build(c, base, kind) for c in configs}
    times = {c: [] for c in configs}
    for r in range(warmup + rounds):
        for c in configs:
            t = time.perf_counter()
            step(*built[c], batch)
            if r >= warmup:
                times[c].append(time.perf_counter() - t)
    tokens = batch["input_ids"].numel()
    return {c: {"median_s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v), "all_s": v}
            for c, v in times.items()}


def peak_rss(model_name: str, config: str, steps: int) -> float:
    """Peak RSS (MB) of a fresh process running ``steps`` steps of one configuration."""
    code = (f"import sys; sys.argv=['x']; import benchmarks.speed as s, resource, torch; torch.set_num_threads(2);"
            f"r=s.measure({model_name!r}, [{config!r}], {steps}, 1);"
            f"print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else float("nan")


def report(model_name: str, res: dict, mem: dict | None) -> list[str]:
    fwd = res.get("base-forward", {}).get("median_s")
    pairs = [("qkvtune-lora-qv", "peft-lora-qv"), ("qkvtune-lora-qkv", "peft-lora-qkv"),
             ("merged-forward", "base-forward"), ("unmerged-forward", "base-forward"),
             ("qkvtune-dense-qv", "full"), ("qkvtune-lora-qv", "full")]
    lines = [f"## {model_name} {SHAPES[model_name][0]}×{SHAPES[model_name][1]}, fp32, {torch.get_num_threads()} threads",
             "| configuration | median step (s) | tokens/s | × forward | peak RSS (MB) |", "|---|---|---|---|---|"]
    for c, r in res.items():
        x_fwd = f"{r['median_s'] / fwd:.2f}" if fwd else "-"
        m = f"{mem[c]:.0f}" if mem and c in mem else "-"
        lines.append(f"| {c} | {r['median_s']:.3f} | {r['tokens_per_s']:.0f} | {x_fwd} | {m} |")
    lines += ["", "| ratio | time | peak memory |", "|---|---|---|"]
    for a, b in pairs:
        if a in res and b in res:
            mr = f"{mem[a] / mem[b]:.2f}" if mem and a in mem and b in mem else "-"
            lines.append(f"| {a} / {b} | {res[a]['median_s'] / res[b]['median_s']:.3f} | {mr} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm", choices=sorted(SHAPES))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS, one subprocess per configuration")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    configs = INFER_CONFIGS + TRAIN_CONFIGS
    res = measure(args.model, configs, args.rounds, args.warmup)
    mem = {c: peak_rss(args.model, c, 3) for c in configs} if args.memory else None
    lines = report(args.model, res, mem)
    print("\n".join(lines))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"speed_{args.model}.json"), "w") as f:
        json.dump({"model": args.model, "shape": SHAPES[args.model], "results": res, "peak_rss_mb": mem,
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "date": time.strftime("%Y-%m-%d")}, f, indent=2)


if __name__ == "__main__":
    main()
