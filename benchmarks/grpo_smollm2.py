"""GRPO on SmolLM2-135M-Instruct with LoRA, on a verifiable-reward set of sums written by this script (seeded,
under --out, never into the project): "What is 47 plus 38? …end your reply with 'Answer: <number>'", rewarded
by the exact answer (``answer``: the reply's last number) plus the requested format (``regex``).

For each seed a run trains by GRPO and is scored by the mean summed reward of its greedy replies to 100 held-out
prompts; the gain is that minus the pretrained model's (greedy, so one figure for all seeds), with its 90 %
interval over seeds (Student t, n − 1 degrees of freedom). Then the peak memory of qkvtune's GRPO against TRL's
GRPOTrainer with a PEFT LoraConfig on the same settings (each in its own process, the same steps, LoRA on the
same matrices at the same rank), as the peak resident set size of each process.

    python benchmarks/grpo_smollm2.py --out runs/bench-grpo     # writes benchmarks/GRPO.md and GRPO.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ASK = "What is {a} plus {b}? End your reply with \"Answer: \" followed by the number."
FORMAT = r"regex:Answer: -?\d+\s*$"
TRAIN = {"model": "smollm2-135m", "task": "prompts", "as_chat": True, "reward": ["answer", FORMAT],
         "method": "lora", "targets": ["q", "v", "o", "down"], "rank": 16, "alpha": 32, "lr": 5e-4,
         "warmup_ratio": 0.0, "batch_size": 8, "grpo_generations": 4, "grpo_completion_length": 48,
         "grpo_temperature": 1.0, "eval_batch_size": 50, "max_steps": 30, "eval_strategy": "no",
         "logging_steps": 5, "max_train_samples": 400}


def sums(out: str, n_train: int = 400, n_test: int = 100) -> tuple[str, str]:
    """Two-digit sums, seeded; the test prompts are pairs the training prompts do not hold."""
    rng = random.Random("grpo-sums")
    pairs = list(dict.fromkeys((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(4 * (n_train + n_test))))
    files = []
    for name, chunk in (("train", pairs[:n_train]), ("test", pairs[n_train:n_train + n_test])):
        path = os.path.join(out, f"sums_{name}.jsonl")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"prompt": ASK.format(a=a, b=b), "answer": str(a + b)}) + "\n" for a, b in chunk)
        files.append(path)
    return files[0], files[1]


def settings(args, train_file: str, test_file: str, seed: int, out: str) -> dict:
    return {**TRAIN, "train_file": train_file, "validation_file": test_file, "max_steps": args.steps, "seed": seed,
            "lr": args.lr, "output_dir": out, "overwrite": True}


def pretrained_reward(keys: dict) -> dict:
    """The pretrained model's greedy rewards on the held-out prompts (the run's adapter built, its deltas off)."""
    from qkvtune import attach, runs
    from qkvtune.config import build_config
    from qkvtune.grpo import reward_metrics

    run = runs.build(build_config(keys))
    with attach.heads_only(run.model, run.adapter):
        return reward_metrics(run.model, run.tokenizer, {"test": next(iter(run.task.evals.values()))}, run.cfg)


def memory_child(which: str, keys: dict) -> None:
    """Train ``keys``'s steps by qkvtune's GRPO or by TRL + PEFT, and print this process's peak RSS (MB)."""
    import torch

    from qkvtune import grpo, runs
    from qkvtune.config import build_config
    from qkvtune.trainer import training_arguments

    cfg = build_config({**keys, "logging_steps": 1000})
    run = runs.build(cfg)
    args = grpo.grpo_arguments(cfg, training_arguments(cfg, run.task, "loss", False, has_eval=False))
    if which == "qkvtune":
        trainer = grpo.build_trainer(run.model, run.tokenizer, args, run.task.train, None, cfg.reward, run.adapter,
                                     rates=cfg)
    else:
        import gc

        import peft
        import trl
        from transformers import AutoModelForCausalLM

        from qkvtune.models import resolve
        from qkvtune.rewards import reward_functions

        train_set, tokenizer = run.task.train, run.tokenizer
        del run  # only its data and tokenizer are used: TRL + PEFT loads the model its own way
        gc.collect()
        modules = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                   "down": "down_proj"}
        base = AutoModelForCausalLM.from_pretrained(resolve(cfg.model), dtype=torch.float32)
        trainer = trl.GRPOTrainer(model=base, reward_funcs=reward_functions(cfg.reward), args=args,
                                  train_dataset=train_set, processing_class=tokenizer,
                                  peft_config=peft.LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0,
                                                              target_modules=[modules[t] for t in cfg.targets]))
    t0 = time.time()
    trainer.train()
    print(json.dumps({"which": which, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "seconds": time.time() - t0}))


def interval(gains: list[float], level: float = 0.90) -> tuple[float, float]:
    from scipy import stats

    m = statistics.mean(gains)
    if len(gains) < 2:
        return m, m
    half = stats.t.ppf(0.5 + level / 2, len(gains) - 1) * statistics.stdev(gains) / len(gains) ** 0.5
    return m - half, m + half


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/bench-grpo")
    p.add_argument("--report", default=os.path.join(HERE, "GRPO.md"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=TRAIN["max_steps"])
    p.add_argument("--lr", type=float, default=TRAIN["lr"])
    p.add_argument("--memory-steps", type=int, default=5)
    p.add_argument("--memory-child", choices=["qkvtune", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--keys", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, json.loads(args.keys))
        return 0
    from qkvtune.files import write_json
    from qkvtune.config import build_config
    from qkvtune.train import train

    start = time.time()
    os.makedirs(args.out, exist_ok=True)
    train_file, test_file = sums(args.out)
    seeds = [int(s) for s in args.seeds.split(",")]
    base = pretrained_reward(settings(args, train_file, test_file, 0, os.path.join(args.out, "base")))
    print("pretrained", json.dumps(base), flush=True)
    runs_ = {}
    for seed in seeds:
        t0 = time.time()
        out = os.path.join(args.out, f"seed{seed}")
        metrics = train(build_config(settings(args, train_file, test_file, seed, out)))
        history = json.load(open(os.path.join(out, f"checkpoint-{args.steps}", "trainer_state.json")))["log_history"]
        runs_[seed] = {"seconds": time.time() - t0, **{k: v for k, v in metrics.items() if k.startswith("eval_reward")},
                       "train_reward": [h["reward"] for h in history if "reward" in h],
                       "train_kl": [h.get("kl") for h in history if "reward" in h],
                       "completion_length": [h["completions/mean_length"] for h in history if "reward" in h]}
        print(seed, json.dumps(runs_[seed]), flush=True)
    gains = [r["eval_reward"] - base["test_reward"] for r in runs_.values()]
    lo, hi = interval(gains)
    memory = {}
    for which in ("qkvtune", "trl"):
        keys = settings(args, train_file, test_file, 0, os.path.join(args.out, f"memory-{which}"))
        keys["max_steps"] = args.memory_steps
        done = subprocess.run([sys.executable, __file__, "--memory-child", which, "--keys", json.dumps(keys)],
                              capture_output=True, text=True, check=True)
        memory[which] = json.loads(done.stdout.strip().splitlines()[-1])
        print(which, json.dumps(memory[which]), flush=True)
    total = time.time() - start
    longest = max(r["seconds"] for r in runs_.values())
    parts = {name.split("/", 1)[1]: name for name in base if "/" in name}
    lines = [f"# GRPO on SmolLM2-135M-Instruct: LoRA r 16 on q, v, o, down, {args.steps} steps of "
             f"{TRAIN['batch_size']} completions ({TRAIN['grpo_generations']} per prompt), lr {args.lr:g} (CPU, 2 cores)",
             "", "Prompts: two-digit sums written by `benchmarks/grpo_smollm2.py` (seeded; 400 to train, 100 held out). "
             "Reward: the exact answer (1) plus the asked-for ending `Answer: <number>` (1), so 0–2. Held-out "
             "reward: the mean over the 100 held-out prompts of the greedy reply's reward.", "",
             "| | held-out reward | exact answer | format | train time |", "|---|---|---|---|---|",
             f"| pretrained | {base['test_reward']:.3f} | {base['test_reward/answer_reward']:.3f} | "
             f"{base[parts[FORMAT]]:.3f} | |"]
    for seed, r in runs_.items():
        lines.append(f"| seed {seed} | {r['eval_reward']:.3f} | {r['eval_reward/answer_reward']:.3f} | "
                     f"{r['eval_reward/' + FORMAT]:.3f} | {r['seconds'] / 60:.1f} min |")
    met = len(gains) >= 2 and lo > 0 and longest <= 20 * 60  # one seed has no interval
    lines += ["", f"Gain over the pretrained model: {statistics.mean(gains):+.3f} (seeds {', '.join(f'{g:+.3f}' for g in gains)}); "
              f"90 % interval over {len(gains)} seeds (t, {len(gains) - 1} d.f.): [{lo:+.3f}, {hi:+.3f}]. Longest run "
              f"{longest / 60:.1f} min. Target (interval excludes 0, each run within 20 minutes): "
              f"{'met' if met else '**not met**'}.", "",
              f"Peak memory, {args.memory_steps} steps of the same settings, each in its own process (resident set "
              f"size, libraries included): qkvtune {memory['qkvtune']['peak_rss_mb']:.0f} MB, TRL + PEFT "
              f"{memory['trl']['peak_rss_mb']:.0f} MB (ratio {memory['qkvtune']['peak_rss_mb'] / memory['trl']['peak_rss_mb']:.3f}; "
              f"target ≤ 1: {'met' if memory['qkvtune']['peak_rss_mb'] <= memory['trl']['peak_rss_mb'] else '**not met**'}). "
              f"Step time there: qkvtune {memory['qkvtune']['seconds'] / args.memory_steps:.1f} s, TRL + PEFT "
              f"{memory['trl']['seconds'] / args.memory_steps:.1f} s.", "",
              f"Whole benchmark: {total / 60:.1f} min."]
    with open(args.report, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    write_json(os.path.splitext(args.report)[0] + ".json", {
        "settings": {**TRAIN, "max_steps": args.steps, "lr": args.lr}, "seeds": seeds, "pretrained": base,
        "runs": runs_, "gains": gains, "interval90": [lo, hi], "memory": memory, "seconds": total})
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
