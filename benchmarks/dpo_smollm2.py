"""DPO on SmolLM2-135M-Instruct with LoRA, on two preference sets built from ../shared/datasets (written under
--out, never into the project):

* format: Alpaca instructions whose prompt asks for the answer in one sentence starting with "In short:"; the
  chosen answer is the record's first sentence with that opening, the rejected one the same sentence without it.
  The pair differs only in following the requested format, which a 135M model can learn: the target (reward
  accuracy >= 0.8 on held-out pairs) is judged here.
* arc: ARC-Easy questions; chosen "the correct answer is answerK" (the right option), rejected the same sentence
  naming a wrong option (seeded). Telling right from wrong is knowledge the model mostly lacks: the figure is
  reported, whatever it is.

    python benchmarks/dpo_smollm2.py --data-dir ../shared/datasets --out runs/bench-dpo   # writes benchmarks/DPO.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASK = "\n\nAnswer in one sentence that starts with \"In short:\"."
TRAIN = {"model": "smollm2-135m", "task": "preference", "as_chat": True, "method": "lora", "targets": "all-linear",
         "rank": 16, "alpha": 32, "lr": 5e-4, "warmup_ratio": 0.0, "dpo_beta": 0.1, "batch_size": 4,
         "eval_batch_size": 8, "max_length": 256, "max_steps": 60, "eval_strategy": "no", "seed": 0}


def first_sentence(text: str) -> str:
    s = re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]
    return s if len(s) < 300 else s[:300].rsplit(" ", 1)[0] + "."


def format_pairs(data_dir: str, out: str) -> str:
    records = json.load(open(os.path.join(data_dir, "text", "alpaca_data_1k.json"), encoding="utf-8"))
    path = os.path.join(out, "format_pairs.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            prompt = r["instruction"] + ("\n\n" + r["input"] if r.get("input") else "") + ASK
            sentence = first_sentence(r["output"])
            if not sentence:
                continue
            f.write(json.dumps({"prompt": prompt, "chosen": "In short: " + sentence[0].lower() + sentence[1:],
                                "rejected": sentence}) + "\n")
    return path


def arc_pairs(data_dir: str, out: str, split: str) -> str:
    records = json.load(open(os.path.join(data_dir, "commonsense", "ARC-Easy", f"{split}.json"), encoding="utf-8"))
    rng = random.Random(f"arc:{split}")
    path = os.path.join(out, f"arc_pairs_{split}.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            options = sorted(set(re.findall(r"answer\d", r["instruction"].lower())) - {r["answer"]})
            if not options:
                continue
            wrong = rng.choice(options)
            f.write(json.dumps({"prompt": r["instruction"], "chosen": f"the correct answer is {r['answer']}",
                                "rejected": f"the correct answer is {wrong}"}) + "\n")
    return path


def main() -> int:
    from qkvtune.config import build_config
    from qkvtune.files import write_json
    from qkvtune.train import train

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("QKVTUNE_DATA", os.path.join(HERE, "..", "..", "shared",
                                                                                      "datasets")))
    p.add_argument("--out", default="runs/bench-dpo")
    p.add_argument("--report", default=os.path.join(HERE, "DPO.md"))
    p.add_argument("--steps", type=int, default=TRAIN["max_steps"])
    p.add_argument("--again", action="store_true", help="rerun sets an earlier call finished")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    sets = {"format": {"train_file": format_pairs(args.data_dir, args.out), "val_size": 100, "max_train_samples": 600},
            "arc": {"train_file": arc_pairs(args.data_dir, args.out, "train"), "max_train_samples": 600,
                    "validation_file": arc_pairs(args.data_dir, args.out, "test"), "max_eval_samples": 200}}
    results = {}
    for name, keys in sets.items():
        done = os.path.join(args.out, name, "bench.json")  # a set finished by an earlier call is read, not rerun
        if os.path.exists(done) and json.load(open(done))["steps"] == args.steps and not args.again:
            results[name] = json.load(open(done))["result"]
            print(name, "(from", done + ")", json.dumps(results[name]), flush=True)
            continue
        t0 = time.time()
        metrics = train(build_config({**TRAIN, **keys, "max_steps": args.steps,
                                      "output_dir": os.path.join(args.out, name), "overwrite": True}))
        split = "test" if "test_rewards/accuracies" in metrics else "eval"
        results[name] = {"split": split, "seconds": time.time() - t0,
                         **{k.split("_", 1)[1]: v for k, v in metrics.items() if k.startswith(split + "_")}}
        write_json(done, {"steps": args.steps, "result": results[name]})
        print(name, json.dumps(results[name]), flush=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    fmt, arc = results["format"], results["arc"]
    lines = [f"# DPO on SmolLM2-135M-Instruct: LoRA all-linear r 16, {args.steps} steps, batch 4 pairs, β 0.1, lr 5e-4 "
             "(CPU, 2 cores)", "",
             "Preference sets built by `benchmarks/dpo_smollm2.py` from `../shared/datasets` (the script's docstring "
             "says how); held-out pairs, each pair scored against the pretrained model (the run's deltas off).", "",
             "| set | held-out pairs | reward accuracy | reward margin | DPO loss | train time | target |",
             "|---|---|---|---|---|---|---|",
             f"| format (\"In short:\" as the prompt asks) | 100 | {fmt['rewards/accuracies']:.3f} | "
             f"{fmt['rewards/margins']:.3f} | {fmt['loss']:.4f} | {fmt['seconds'] / 60:.1f} min | ≥ 0.8: "
             f"{'met' if fmt['rewards/accuracies'] >= 0.8 else '**not met**'} |",
             f"| ARC-Easy (right vs wrong option) | 200 (test.json) | {arc['rewards/accuracies']:.3f} | "
             f"{arc['rewards/margins']:.3f} | {arc['loss']:.4f} | {arc['seconds'] / 60:.1f} min | the figure |", "",
             f"Peak resident memory of the whole script: {peak:.0f} MB."]
    with open(args.report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    write_json(os.path.splitext(args.report)[0] + ".json", {"settings": TRAIN, "steps": args.steps,
                                                            "results": results, "peak_rss_mb": peak})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
