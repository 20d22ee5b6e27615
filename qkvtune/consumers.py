"""Which tools can load a run's adapter as it is, said at export: PEFT (and what loads through it: transformers'
``pipeline``, lm-eval's ``peft=``), vLLM and llama.cpp (or Ollama). Each has limits users otherwise meet at
serving time: vLLM refuses DoRA's magnitude vectors (vllm#6983) and adapters that save heads or ``lm_head``
(vllm#9280); llama.cpp applies plain LoRA on the architectures whose GGUF layout is known here; lm-eval scores
language models. Every tool loads the merged export."""

from __future__ import annotations

from . import attach
from .gguf_format import ARCHS

MERGED_HF = "the merged model (qkvtune export RUN OUT)"


def cannot_load(model, adapter: str | None, causal_lm: bool) -> list[str]:
    """One line for each tool that cannot load the adapter as it is: why, and what to export instead."""
    deltas = [d for _, d in attach.iter_deltas(model, adapter)]
    no_peft = sorted({d.method for d in deltas if d.peft_type is None})
    not_lora = sorted({d.method for d in deltas if d.low_rank() is None})
    heads = sorted(attach.head_modules(model, adapter))
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    lines = []
    if no_peft:
        lines.append(f"PEFT, transformers pipeline, lm-eval: a {', '.join(no_peft)} update has no PEFT form; "
                     f"load {MERGED_HF}")
    if not causal_lm:
        lines.append("lm-eval: it scores language models, and this run trains a classifier")
    why_not_vllm = [f"{', '.join(not_lora)} is not plain LoRA (vllm#6983)"] if not_lora else []
    if heads:
        why_not_vllm.append(f"it saves trained heads ({', '.join(heads)}; vllm#9280)")
    if not causal_lm:
        why_not_vllm.append("vLLM serves LoRA on generative models")
    if why_not_vllm:
        lines.append(f"vLLM: {'; '.join(why_not_vllm)}; serve {MERGED_HF}")
    if model_type not in ARCHS or not causal_lm:
        lines.append(f"llama.cpp, Ollama: model type {model_type!r} has no GGUF layout checked here; convert "
                     f"{MERGED_HF} with llama.cpp's convert_hf_to_gguf.py")
    elif not_lora or heads:
        lines.append(f"llama.cpp, Ollama: {', '.join(not_lora) or 'a trained head'} cannot be a llama.cpp adapter; "
                     "load the merged GGUF (qkvtune export RUN OUT --format gguf writes model.gguf)")
    return lines
