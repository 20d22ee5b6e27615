"""``qkvtune bench sft``: chat SFT throughput and memory of qkvtune next to TRL's ``SFTTrainer`` + PEFT.

The recipe: SmolLM2-135M-Instruct (``smollm2-135m``) on the shared Alpaca sample as chats (user: instruction and
input; assistant: output; the loss on the assistant turn only), LoRA r 16 (α 32) on q and v, AdamW at 1e-3 with
a linear schedule and no warm-up, one epoch over the same ``--examples`` examples with the same seed, then the
loss on the same ``--dev`` held-out chats (unpacked, ``eval_batch_size`` 64). Every configuration runs in a
fresh process:

* qkvtune: {padded, packed} × {eager, checkpointing, nf4 + checkpointing} × {full logits, chunked loss};
* TRL 1.x ``SFTTrainer`` with a PEFT ``LoraConfig`` on the same model and data (prompt-completion chats, so
  its loss covers the same assistant tokens), padded and with its own packing (best-fit decreasing,
  padding-free), gradient checkpointing off as in qkvtune's eager rows; TRL's loss is its default fused LM
  head, which forms no full logits either.

Padded runs take ``--batch`` examples a step; packed runs one row of ``--max-length`` tokens a step (about as
many examples: the chats average ~110 tokens), so both take about the same number of optimizer steps.

Per configuration: non-padding tokens per second (the epoch's real tokens over Trainer's ``train_runtime``),
the peak memory of the whole process (peak RSS on CPU, evaluation included; ``max_memory_allocated`` on
CUDA), the epoch's training loss and the held-out loss. Ratios against TRL padded, TRL packed and qkvtune's
own padded eager full-logits run. ``--memory`` adds the issue's memory targets: the whole ``qkvtune train``
command at 4×512 tokens (two steps on text blocks, then the final evaluation at the default
``eval_batch_size``) against PEFT's eager LoRA training step on the same tokens.

    qkvtune bench sft --data-dir ../shared/datasets --memory      # writes benchmarks/SFT.md, .png, results/*.json
    qkvtune bench sft --quick                                     # a tiny model in this process: plumbing only
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import resource
import shutil
import tempfile
import time

import torch

from ..errors import QkvtuneError, check_output_file
from ..files import atomic_write, write_json

VARIANTS = {"eager": (False, None), "ckpt": (True, None), "nf4-ckpt": (True, "nf4")}
QKV = [f"qkvtune-{layout}-{v}-{loss}" for layout in ("padded", "packed") for v in VARIANTS for loss in ("full", "chunked")]
TRL = ["trl-padded", "trl-packed"]
REFERENCE = "qkvtune-padded-eager-full"
LORA = {"rank": 16, "alpha": 32.0}
LR = 1e-3
# the memory targets: whole `qkvtune train` commands at 4×512 (name -> overrides), and PEFT's eager step
MEMORY = {"train-eager-full-eval4": {"chunked_loss": "off", "eval_batch_size": 4},
          "train-eager-full": {"chunked_loss": "off"},
          "train-default": {},
          "train-ckpt-chunked": {"gradient_checkpointing": True},
          "train-nf4-ckpt-chunked": {"gradient_checkpointing": True, "quantize": "nf4"},
          "peft-eager-step": None}


def spec_of(name: str) -> dict:
    """What a configuration name means: library, layout, checkpointing, quantization, loss."""
    if name in TRL:
        return {"lib": "trl", "packing": name.endswith("packed"), "ckpt": False, "quantize": None, "chunked": None}
    _, layout, rest = name.split("-", 2)
    variant, loss = rest.rsplit("-", 1)
    ckpt, quantize = VARIANTS[variant]
    return {"lib": "qkvtune", "packing": layout == "packed", "ckpt": ckpt, "quantize": quantize,
            "chunked": loss == "chunked"}


# --- data -------------------------------------------------------------------------------------------------

def chats(source: str, n_train: int, n_dev: int) -> tuple[list, list]:
    """The first n_train + n_dev Alpaca records as one-turn chats, as ``as_chat`` renders them."""
    from ..data.families.sft import as_messages

    with open(source, encoding="utf-8") as f:
        records = json.load(f)
    if len(records) < n_train + n_dev:
        raise QkvtuneError(f"{source}: {len(records)} records, fewer than --examples + --dev = {n_train + n_dev}")
    convs = as_messages("alpaca", [(r["instruction"], r.get("input") or "", r["output"]) for r in records])
    return convs[:n_train], convs[n_train:n_train + n_dev]


def write_messages(convs: list, path: str) -> str:
    with open(path, "w", encoding="utf-8") as f:
        for conv in convs:
            f.write(json.dumps({"messages": conv}) + "\n")
    return path


def _peak_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux: the whole process's peak


# --- one configuration (run in a fresh process) --------------------------------------------------------------

def _qkvtune(job: dict) -> dict:
    from ..config import build_config
    from ..train import train

    s = spec_of(job["name"])
    cfg = build_config({
        "model": job["model"], "task": "sft", "train_file": job["train"], "validation_file": job["dev"],
        "chat_template": job.get("chat_template"), "method": "lora", "targets": ["q", "v"], **LORA, "lr": LR,
        "warmup_ratio": 0.0, "epochs": 1, "max_length": job["max_length"], "seed": 0, "eval_strategy": "no",
        "batch_size": 1 if s["packing"] else job["batch"], "packing": s["packing"],
        "gradient_checkpointing": s["ckpt"], "quantize": s["quantize"], "chunked_loss": "on" if s["chunked"] else "off",
        "logging_steps": 1000, "output_dir": job["out"], "overwrite": True})
    m = train(cfg)
    return {"train_runtime": m["train_runtime"], "train_loss": m["train_loss"], "eval_loss": m["eval_loss"],
            "steps": m["global_step"]}


def _trl(job: dict) -> dict:
    import datasets
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from ..models import default_dtype, load_tokenizer, resolve

    s = spec_of(job["name"])
    tokenizer = load_tokenizer(job["model"])
    if job.get("chat_template"):
        with open(job["chat_template"], encoding="utf-8") as f:
            tokenizer.chat_template = f.read()
    dtype = default_dtype("auto")
    model = AutoModelForCausalLM.from_pretrained(resolve(job["model"]), dtype=dtype)

    def load(path):  # the same chats as prompt-completion records: TRL's loss then covers the assistant turn
        rows = [json.loads(line)["messages"] for line in open(path, encoding="utf-8")]
        return datasets.Dataset.from_list([{"prompt": r[:-1], "completion": r[-1:]} for r in rows])

    cuda = torch.cuda.is_available()
    args = SFTConfig(output_dir=job["out"], per_device_train_batch_size=1 if s["packing"] else job["batch"],
                     per_device_eval_batch_size=64, num_train_epochs=1, learning_rate=LR, lr_scheduler_type="linear",
                     warmup_steps=0, weight_decay=0.0, optim="adamw_torch", seed=0, data_seed=0,
                     max_length=job["max_length"], packing=s["packing"], eval_packing=False,
                     gradient_checkpointing=s["ckpt"], bf16=cuda and dtype == torch.bfloat16, use_cpu=not cuda,
                     report_to=[], save_strategy="no", eval_strategy="no", logging_steps=1000,
                     dataloader_num_workers=0, disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=load(job["train"]), eval_dataset=load(job["dev"]),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    tokens = sum(len(x) for x in trainer.train_dataset["input_ids"])
    out = trainer.train()
    return {"train_runtime": out.metrics["train_runtime"], "train_loss": out.training_loss,
            "eval_loss": trainer.evaluate()["eval_loss"], "steps": out.global_step, "tokens": tokens}


def _memory_job(job: dict) -> dict:
    """A whole `qkvtune train` at 4×512 tokens (two steps, then the final evaluation), or PEFT's eager step."""
    overrides = MEMORY[job["name"]]
    if overrides is None:
        import peft

        from ..models import load_model
        from ..task import TaskInfo
        from .harness import make_batch

        model, tokenizer, _ = load_model(job["model"], "causal_lm", dtype="auto")
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                                          target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
        model.train()
        batch = make_batch(tokenizer, TaskInfo("causal_lm", 0), 4, job["max_length"],
                           "cuda" if torch.cuda.is_available() else "cpu")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {}
    from ..config import build_config
    from ..train import train

    train(build_config({"model": job["model"], "task": "text/tinyshakespeare.txt", "data_dir": job["data_dir"],
                        "targets": ["q", "v"], **LORA, "lr": LR, "max_length": job["max_length"], "batch_size": 4,
                        "max_steps": 2, "max_train_samples": 8, "max_eval_samples": 64, "eval_strategy": "no",
                        "output_dir": job["out"], "overwrite": True, **overrides}))
    return {}


def child(job: dict) -> dict:
    """One configuration, measured: runs in a fresh process (``measure``), or in this one (``--quick``)."""
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        torch.set_num_threads(int(os.environ.get("QKVTUNE_BENCH_THREADS", "2")))
    else:
        torch.cuda.reset_peak_memory_stats()
    if job.get("memory"):
        result = _memory_job(job)
    else:
        result = (_trl if spec_of(job["name"])["lib"] == "trl" else _qkvtune)(job)
    result["peak_mb"] = _peak_mb()
    return result


def measure(job: dict) -> dict:
    from .harness import in_fresh_process

    return in_fresh_process(f"import json; from qkvtune.bench.sft import child; print('RESULT ' + json.dumps(child({job!r})))")


# --- report -------------------------------------------------------------------------------------------------

def qkvtune_tokens(model: str, train: str, max_length: int, chat_template: str | None) -> int:
    """The real (non-padding) tokens of one epoch of qkvtune's training set: the same for every layout."""
    from ..data import load_task
    from ..data.causal import set_chat_template
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(model)
    set_chat_template(tokenizer, chat_template)
    task = load_task("sft", tokenizer, train_file=train, validation_file=train, max_length=max_length,
                     max_eval_samples=1, seed=0)
    return sum(len(x) for x in task.train["input_ids"])


# (configuration, reference, what the target is, bound on configuration/reference) for tokens/s or peak
TARGETS = [("qkvtune-packed-eager-chunked", "trl-padded", "tokens/s", 1.3),
           ("qkvtune-packed-eager-chunked", "trl-packed", "tokens/s", 1.0),
           ("qkvtune-packed-eager-chunked", "trl-packed", "peak", 1.0),
           ("qkvtune-padded-eager-chunked", "trl-padded", "peak", 1.0)] + \
          [(f"qkvtune-{layout}-{v}-chunked", f"qkvtune-{layout}-{v}-full", "tokens/s", 0.95)
           for layout in ("padded", "packed") for v in VARIANTS]
MEMORY_TARGETS = [("train-ckpt-chunked", "train-eager-full-eval4", 0.45),
                  ("train-nf4-ckpt-chunked", "train-eager-full-eval4", 0.35),
                  ("train-default", "peft-eager-step", 1.0)]


def report(results: dict, memory: dict | None = None) -> dict:
    rows = []
    for name, r in results.items():
        row = {"config": name, **r}
        if "error" not in r:
            row["tokens_per_s"] = r["tokens"] / r["train_runtime"]
        rows.append(row)
    by = {r["config"]: r for r in rows}
    value = lambda c, what: by.get(c, {}).get("tokens_per_s" if what == "tokens/s" else "peak_mb", float("nan"))
    for r in rows:
        for ref in (*TRL, REFERENCE):
            r[f"tokens_vs_{ref}"] = value(r["config"], "tokens/s") / value(ref, "tokens/s")
            r[f"peak_vs_{ref}"] = value(r["config"], "peak") / value(ref, "peak")
    checks = []
    for c, ref, what, bound in TARGETS:
        if c in by and ref in by:
            ratio = value(c, what) / value(ref, what)
            met = ratio >= bound if what == "tokens/s" else ratio <= bound
            checks.append({"config": c, "reference": ref, "what": what, "ratio": ratio,
                           "target": f"{'≥' if what == 'tokens/s' else '≤'} {bound}", "met": bool(met)})
    mem = []
    for c, ref, bound in MEMORY_TARGETS if memory else ():
        if c in memory and ref in memory:
            ratio = memory[c].get("peak_mb", float("nan")) / memory[ref].get("peak_mb", float("nan"))
            mem.append({"config": c, "reference": ref, "what": "peak", "ratio": ratio, "target": f"≤ {bound}",
                        "met": bool(ratio <= bound)})
    return {"rows": rows, "checks": checks, "memory": memory or {}, "memory_checks": mem}


def table(rep: dict, header: str) -> str:
    lines = [header, "", "| configuration | steps | tokens/s | × TRL padded | × TRL packed | × qkvtune eager | peak MB | "
             "× TRL padded | train loss | held-out loss |", "|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda x, d=2: "–" if x != x else f"{x:.{d}f}"
    for r in rep["rows"]:
        if "error" in r:
            lines.append(f"| {r['config']} | failed: {r['error']} |||||||||")
            continue
        lines.append(f"| {r['config']} | {r['steps']} | {r['tokens_per_s']:.0f} | {f(r['tokens_vs_trl-padded'])} | "
                     f"{f(r['tokens_vs_trl-packed'])} | {f(r['tokens_vs_' + REFERENCE])} | {r['peak_mb']:.0f} | "
                     f"{f(r['peak_vs_trl-padded'])} | {r['train_loss']:.4f} | {r['eval_loss']:.4f} |")
    checks = rep["checks"] + rep["memory_checks"]
    if checks:
        lines += ["", "| configuration | against | what | ratio | target | met |", "|---|---|---|---|---|---|"]
        lines += [f"| {c['config']} | {c['reference']} | {c['what']} | {f(c['ratio'], 3)} | {c['target']} | "
                  f"{'yes' if c['met'] else 'NO'} |" for c in checks]
    if rep["memory"]:
        lines += ["", "Whole-command peaks at 4×512 tokens (two steps, then the final evaluation of 64 blocks):", "",
                  "| run | peak MB |", "|---|---|"]
        lines += [f"| {n} | {f(r.get('peak_mb', float('nan')), 0)}{' (' + r['error'] + ')' if 'error' in r else ''} |"
                  for n, r in rep["memory"].items()]
    return "\n".join(lines)


def plot(rep: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rep["rows"] if "error" not in r]
    names = [r["config"].replace("qkvtune-", "") for r in rows]
    colors = ["tab:orange" if r["config"].startswith("trl") else "tab:blue" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(rows) + 1.5), sharey=True)
    for ax, key, label in ((axes[0], "tokens_per_s", "non-padding tokens / s"), (axes[1], "peak_mb", "peak memory (MB)")):
        ax.barh(names, [r[key] for r in rows], color=colors)
        ax.set_xlabel(label)
        ax.invert_yaxis()
    axes[0].set_title("qkvtune (blue) and TRL + PEFT (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the command ----------------------------------------------------------------------------------------------

TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


def tiny_model(folder: str) -> tuple[str, str]:
    """(--quick) a tiny Llama with MiniLM's tokenizer and a chat-template file: plumbing, not figures."""
    import transformers

    from ..models import resolve

    tokenizer = transformers.AutoTokenizer.from_pretrained(resolve("minilm"))
    tokenizer.eos_token = tokenizer.sep_token
    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
                                   pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id,
                                   bos_token_id=tokenizer.cls_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    template = os.path.join(folder, "chat.jinja")
    with open(template, "w", encoding="utf-8") as f:
        f.write(TEMPLATE)
    return folder, template


def run(args) -> int:
    from ..data import resolve_data_dir

    if args.quick:  # a smoke test: few short examples on a tiny model
        args.examples, args.dev, args.max_length, args.batch = min(args.examples, 8), min(args.dev, 4), 96, 2
    data_dir = resolve_data_dir(args.data_dir)
    source = os.path.join(data_dir or "", "text", "alpaca_data_1k.json")
    if data_dir is None or not os.path.isfile(source):
        raise QkvtuneError("--data-dir: needs text/alpaca_data_1k.json (the shared datasets folder, or QKVTUNE_DATA)")
    configs = [] if args.configs == "none" else args.configs.split(",") if args.configs else QKV + TRL
    unknown = [c for c in configs if c not in QKV + TRL]
    if unknown:
        raise QkvtuneError(f"--configs: {unknown[0]!r} is not one of {', '.join(QKV + TRL)}")
    if importlib.util.find_spec("trl") is None:
        skipped = [c for c in configs if c in TRL]
        configs = [c for c in configs if c not in TRL]
        if skipped:
            print(f"bench sft: TRL is not installed (pip install 'qkvtune[bench]'); skipping {', '.join(skipped)}")
    for path, key in ((args.report, "--report"), (args.results, "--results")):
        if path:
            check_output_file(path, key)
    work = tempfile.mkdtemp(prefix="qkvtune-bench-sft-")
    start = time.perf_counter()
    try:
        model, template = (tiny_model(os.path.join(work, "model")) if args.quick else (args.model, None))
        train, dev = chats(source, args.examples, args.dev)
        jobs = {"model": model, "chat_template": template, "max_length": args.max_length, "batch": args.batch,
                "train": write_messages(train, os.path.join(work, "train.jsonl")),
                "dev": write_messages(dev, os.path.join(work, "dev.jsonl")), "data_dir": data_dir}
        tokens = qkvtune_tokens(model, jobs["train"], args.max_length, template)
        results, memory = {}, {}
        from tqdm.auto import tqdm

        for name in tqdm(configs, desc="bench sft (a fresh process each)" if not args.quick else "bench sft --quick"):
            job = {**jobs, "name": name, "out": os.path.join(work, name)}
            r = child(job) if args.quick else measure(job)
            results[name] = {"tokens": tokens, **r} if "error" not in r and "tokens" not in r else r
            shutil.rmtree(job["out"], ignore_errors=True)
        for name in MEMORY if args.memory else ():
            job = {**jobs, "name": name, "memory": True, "max_length": 512 if not args.quick else args.max_length,
                   "out": os.path.join(work, name)}
            memory[name] = child(job) if args.quick else measure(job)
            shutil.rmtree(job["out"], ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    minutes = (time.perf_counter() - start) / 60
    rep = report(results, memory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    header = (f"# qkvtune bench sft: {'tiny Llama (--quick)' if args.quick else args.model}, Alpaca chats, "
              f"{args.examples} examples (+{args.dev} held out), max_length {args.max_length}, padded batch "
              f"{args.batch} / packed 1 row, LoRA q,v r {LORA['rank']}, {device} "
              f"({'fp32' if device == 'cpu' else 'bf16'}), {minutes:.1f} min")
    text = table(rep, header)
    print(text)
    if args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
        atomic_write(args.report, lambda tmp: pathlib.Path(tmp).write_text(text + "\n", encoding="utf-8"))
        plot(rep, os.path.splitext(args.report)[0] + ".png")
    if args.results:
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        write_json(args.results, {"model": args.model, "examples": args.examples, "dev": args.dev,
                                  "max_length": args.max_length, "batch": args.batch, "device": device,
                                  "minutes": minutes, **rep})
    return 0


def register(sub) -> None:
    p = sub.add_parser("sft", help="chat SFT throughput and memory: qkvtune's layouts and losses against TRL + PEFT")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None, help="folder holding text/alpaca_data_1k.json (default: QKVTUNE_DATA)")
    p.add_argument("--examples", type=int, default=64, help="training chats (one epoch)")
    p.add_argument("--dev", type=int, default=16, help="held-out chats for the loss after training")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch", type=int, default=4, help="examples per padded step (packed steps take one row)")
    p.add_argument("--configs", default=None, help=f"comma-separated subset of {', '.join(QKV + TRL)}, or none (--memory only)")
    p.add_argument("--memory", action="store_true", help="also the whole-command memory targets at 4×512 tokens")
    p.add_argument("--quick", action="store_true", help="a tiny model, few examples, in this process (a smoke test)")
    p.add_argument("--report", default=None, help="Markdown report (a PNG is written beside it)")
    p.add_argument("--results", default=None, help="JSON results")
    p.set_defaults(func=run)
