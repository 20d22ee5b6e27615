"""The benchmarks' shared harness: the models, batches and adapters they compare (PEFT's LoRA and qkvtune's with
the same r and α, a fixed SMT selection), and the peak-memory counters and fresh-process runs they measure with."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

PEFT_MODULES = {"q": ["query", "q_proj"], "k": ["key", "k_proj"], "v": ["value", "v_proj"]}
LORA = {"rank": 8, "alpha": 16}
SMT_BUDGET, SMT_BLOCK = 0.01, 64


def model_task(name: str):
    """The task a benchmark trains ``name`` for: its causal-LM loss, else two classes on a fresh head."""
    from ..errors import QkvtuneError
    from ..models import resolve
    from ..task import TaskInfo

    info = TaskInfo.of_model(resolve(name), QkvtuneError)
    return info if info.causal_lm else TaskInfo(info.kind, 2)


def load_base(name: str, device: str, quantize: str | None = None):
    """(base model on ``device`` in the benchmark dtype, its task, tokenizer); ``model.qkvtune_new_modules``
    names the freshly initialised head (trained, as in ``qkvtune train``)."""
    from ..models import load_model

    task = model_task(name)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer, new_modules = load_model(name, task.kind, task.model_labels(), dtype=dtype, quantize=quantize)
    model.qkvtune_new_modules = new_modules
    return (model if quantize else model.to(device)), task, tokenizer


def make_batch(tokenizer, task, batch: int, seq: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    low = min(1000, tokenizer.vocab_size // 2)
    ids = torch.randint(low, min(tokenizer.vocab_size, 20000), (batch, seq), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
           "labels": ids.clone() if task.causal_lm else torch.randint(0, 2, (batch,), generator=g)}
    return {k: v.to(device) for k, v in out.items()}


def smt_selection(model) -> list[dict]:
    """A fixed random selection of SMT_BUDGET of the parameters in SMT_BLOCK blocks of q, k, v (seeded)."""
    from .. import smt

    g = torch.Generator().manual_seed(0)
    scores = {(t.module, t.kind): torch.rand(t.shape, generator=g) for t in smt.eligible_targets(model, ("q", "k", "v"))}
    return smt.select_blocks(scores, SMT_BLOCK, budget=SMT_BUDGET, total_params=smt.count_parameters(model))


def adapt(model, method: str, heads: list[str], kinds: str = "qv"):
    """qkvtune's configuration ``method`` on ``model``, in place: ``full`` trains every weight; a method that selects
    its blocks (SMT) gets the fixed random selection; any other its adapter on the slices of ``kinds`` (LoRA's r
    and α, no dropout; keys a method does not take are left out by ``build_delta``)."""
    from .. import attach
    from ..deltas import delta_class
    from ..targets import find_targets

    if method == "full":
        model.requires_grad_(True)
    elif delta_class(method).needs_selection:
        from .. import smt

        selection = smt_selection(model)
        attach.add_adapter(model, smt.targets_of(model, selection), method, heads=heads, block_size=SMT_BLOCK,
                           blocks=selection)
    else:
        attach.add_adapter(model, find_targets(model, list(kinds)), method, heads=heads, **LORA, dropout=0.0)
    return model


def peft_lora(model, kinds: str, task=None):
    """PEFT's LoRA (r, α as qkvtune's; no dropout) on the projections of ``kinds`` (e.g. "qv"), for ``task``'s
    model class (None: the bare model, as for inference)."""
    import peft

    cfg = peft.LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                          task_type=task.peft_task_type if task is not None else None,
                          target_modules=[m for k in kinds for m in PEFT_MODULES[k]])
    return peft.get_peft_model(model, cfg)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_from_now():
    """A function giving the peak RSS in MB since this call (``/proc/self/clear_refs`` resets VmHWM to the current
    RSS, so loading and copying before it do not count; where that is refused, the whole process's peak)."""
    import resource

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return lambda: status_kb("VmHWM") / 1024
    except OSError:
        return lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_fresh_process(code: str, marker: str = "RESULT ") -> dict | None:
    """Run ``code`` in a fresh Python process (peaks never mix) from the project root; the JSON it printed after
    ``marker``, or None (with the last line of its stderr under "error") when it failed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    line = next((l for l in out.stdout.splitlines() if l.startswith(marker)), None)
    if out.returncode != 0 or line is None:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[len(marker):])
