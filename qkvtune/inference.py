"""The two loops that run a model without training it: a batched forward pass (logits, or any read of the
output) and batched generation. Evaluation, ``predict``, the commonsense scorer and the NTK's outputs all go
through these, in eval mode without gradients, restoring the model's mode after.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch


@contextlib.contextmanager
def evaluating(model):
    """Eval mode for the duration (dropout off), the previous mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def batches(examples: list, collator, batch_size: int) -> list[dict]:
    """Tokenized examples in collated batches of ``batch_size``, in order."""
    return [collator(examples[s:s + batch_size]) for s in range(0, len(examples), batch_size)]


@torch.no_grad()
def forward(model, batches: Iterable[dict], read: Callable | None = None, desc: str | None = None,
            labels: bool = False) -> torch.Tensor:
    """``read(model output, batch)`` (default: the logits in float32) for each batch — moved to the model's
    device; the model never sees its labels, and ``read`` sees them only with ``labels=True`` — concatenated on
    the CPU in batch order. ``desc``: a progress bar."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    read = read or (lambda out, batch: out.logits.float())
    out = []
    with evaluating(model):
        for batch in tqdm(batches, desc=desc, unit="batch", disable=desc is None):
            batch = {k: v.to(device) for k, v in batch.items()}
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            out.append(read(model(**inputs), batch if labels else inputs).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate(model, tokenizer, prompt_ids: list[list[int]], *, batch_size: int, max_new_tokens: int,
             sampling: dict | None = None, desc: str = "generate") -> list[str]:
    """The decoded continuation of each prompt (token ids), in order: left-padded batches for decoder-only models
    (they continue from the last position), greedy unless ``sampling`` gives ``do_sample``/``temperature``/
    ``top_p``; only the new tokens are decoded."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    encoder_decoder = getattr(model.config, "is_encoder_decoder", False)
    side, tokenizer.padding_side = tokenizer.padding_side, "right" if encoder_decoder else "left"
    texts = []
    try:
        with evaluating(model):
            for s in tqdm(range(0, len(prompt_ids), batch_size), desc=desc, unit="batch"):
                enc = tokenizer.pad({"input_ids": prompt_ids[s:s + batch_size]}, padding=True,
                                    return_tensors="pt").to(device)
                ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                     max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                                     **(sampling or {"do_sample": False}))
                if not encoder_decoder:
                    ids = ids[:, enc["input_ids"].shape[1]:]  # the continuation only
                texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return texts
