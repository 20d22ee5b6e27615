"""``packing: true`` (task sft and text/…): training examples packed into rows of ``max_length`` tokens.

A chat or instruction set padded per batch spends much of its compute on padding (Alpaca's examples run from
~40 to ~500 tokens). Packed, each row holds several whole examples (best-fit decreasing: ~99% full), their
``position_ids`` restart at 0 at each example, and no attention mask is passed: transformers then reads the
example boundaries off the position ids (``find_packed_sequence_indices``) and builds a block-diagonal causal
mask for SDPA and eager attention, or FlashAttention's varlen boundaries, so no example attends to another.
The first label of every example is ``-100`` (the token before it belongs to the previous example and must not
predict it), which is what an unpacked batch computes too: every example's per-token loss is the unpacked one.

FlashAttention reads packed sequences from a single row only, so for it the batch is flattened into one row
without any padding (``DataCollatorWithFlattening``'s layout); SDPA and eager keep one row per ``max_length``
(their cost grows with the square of a row's length), padded to the batch's longest row.

Evaluation and ``predict`` stay unpacked: ``PackedCollator`` hands unpacked examples to the task's own collator.
``check`` refuses, before training, a model whose attention does not honour packed positions (tested on a tiny
packed batch against the same examples alone).
"""

from __future__ import annotations

import datasets
import torch

from .errors import QkvtuneError, first_line

IGNORE = -100


class PackingError(QkvtuneError):
    """``packing: true`` for a model whose attention cannot keep packed examples apart."""


def best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: each item (longest first) goes into the fullest bin it fits, else a new bin. Bins as
    lists of item indices in their original order, ordered by their first item. A segment tree over the free
    space (0…capacity) finds the fullest bin that fits in O(log capacity)."""
    size = 1
    while size < capacity + 1:
        size *= 2
    count = [0] * (2 * size)          # leaves: how many bins have exactly that much free space
    free_bins: list[list[int]] = [[] for _ in range(capacity + 1)]

    def update(space: int, delta: int) -> None:
        i = space + size
        while i:
            count[i] += delta
            i //= 2

    def smallest_at_least(n: int) -> int | None:
        """The least free space ≥ n that some bin has."""
        def down(node: int, lo: int, hi: int) -> int | None:
            if hi < n or count[node] == 0:
                return None
            if lo == hi:
                return lo
            mid = (lo + hi) // 2
            found = down(2 * node, lo, mid)
            return found if found is not None else down(2 * node + 1, mid + 1, hi)
        return down(1, 0, size - 1)

    bins: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        space = smallest_at_least(n)
        if space is None:
            bins.append([i])
            b, left = len(bins) - 1, capacity - n
        else:
            b = free_bins[space].pop()
            update(space, -1)
            bins[b].append(i)
            left = space - n
        free_bins[left].append(b)
        update(left, 1)
    return sorted((sorted(b) for b in bins), key=lambda b: b[0])


def pack(examples: datasets.Dataset, max_length: int) -> datasets.Dataset:
    """Rows of at most ``max_length`` tokens: ``input_ids``, ``labels`` (each example's first label -100) and
    ``position_ids`` (from 0 at each example). Every example is kept whole (they are ≤ max_length already)."""
    ids, labels = examples["input_ids"], examples["labels"]
    rows = {"input_ids": [], "labels": [], "position_ids": []}
    for b in best_fit([len(x) for x in ids], max_length):
        rows["input_ids"].append([t for i in b for t in ids[i]])
        rows["labels"].append([y for i in b for y in [IGNORE, *labels[i][1:]]])
        rows["position_ids"].append([p for i in b for p in range(len(ids[i]))])
    return datasets.Dataset.from_dict(rows)


class PackedCollator:
    """Packed rows into a batch (no attention mask: the position ids carry the boundaries); anything else
    (evaluation's unpacked examples) goes to ``plain``, the task's own collator. ``flatten``: the batch as one
    row without padding (FlashAttention); else one row each, padded to the longest (labels -100, positions
    running on, so the padding is a tail that no real token attends to)."""

    def __init__(self, plain, flatten: bool = False, pad_id: int | None = None):
        self.plain, self.flatten = plain, flatten
        self.pad_id = pad_id if pad_id is not None else getattr(getattr(plain, "tokenizer", None), "pad_token_id", 0)

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if "position_ids" not in features[0]:
            return self.plain(features)
        rows = [{k: list(f[k]) for k in ("input_ids", "labels", "position_ids")} for f in features]
        if self.flatten:
            rows = [{k: [v for r in rows for v in r[k]] for k in rows[0]}]
        width = max(len(r["input_ids"]) for r in rows)
        for r in rows:
            n = width - len(r["input_ids"])
            r["input_ids"] += [self.pad_id or 0] * n
            r["labels"] += [IGNORE] * n
            r["position_ids"] += range(r["position_ids"][-1] + 1, r["position_ids"][-1] + 1 + n)
        batch = {k: torch.tensor([r[k] for r in rows], dtype=torch.long) for k in rows[0]}
        batch["use_cache"] = False  # transformers reads packed sequences off position_ids only without a cache
        return batch


def flattens(model) -> bool:
    """Whether the model's attention is a FlashAttention (which reads packed sequences from a single row)."""
    try:
        from transformers.utils import is_flash_attention_requested
    except ImportError:
        return False
    return bool(is_flash_attention_requested(model.config))


@torch.no_grad()
def packed_mismatch(model, collator: PackedCollator) -> str | None:
    """Why packed examples would not compute what they compute alone in ``model``, or None: three short random
    examples, two packed into one row and one in a second (as ``collator`` lays out a training batch), each
    token's logits against the same example run alone (eval mode)."""
    param = next(model.parameters())
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    examples = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (5, 4, 6)]
    rows = [[0, 1], [2]]
    features = [{"input_ids": [t for i in b for t in examples[i]], "labels": [t for i in b for t in examples[i]],
                 "position_ids": [p for i in b for p in range(len(examples[i]))]} for b in rows]
    batch = collator(features)
    was = model.training
    model.eval()
    try:
        packed = model(**{k: v.to(param.device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)},
                       use_cache=batch["use_cache"]).logits.float()
        alone = [model(input_ids=torch.tensor([x], device=param.device), use_cache=False).logits[0].float()
                 for x in examples]
    except Exception as e:  # noqa: BLE001 - a model that cannot take position_ids cannot pack
        return first_line(e)
    finally:
        model.train(was)
    logits = packed.reshape(-1, packed.shape[-1])
    tol = 1e-4 if param.dtype == torch.float32 else 3e-2
    at = 0
    for r, b in enumerate(rows):
        at = at if collator.flatten else r * packed.shape[1]
        for i in b:
            got, ref = logits[at:at + len(examples[i])], alone[i]
            if not torch.allclose(got, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item())):
                return f"an example's logits change by {(got - ref).abs().max().item():.3g} when packed"
            at += len(examples[i])
    return None


def check(model, collator: PackedCollator) -> None:
    """Refuse (one line, naming the model type) a model whose attention does not keep packed examples apart."""
    why = packed_mismatch(model, collator)
    if why is not None:
        kind = getattr(model.config, "model_type", type(model).__name__)
        raise PackingError(f"packing: model type {kind} does not keep packed examples apart through position_ids "
                           f"({why}); train it without packing")


def packed_training(model, examples: datasets.Dataset, collator, max_length: int):
    """(packed rows, their collator) for training ``model`` on ``examples``; a model whose attention cannot keep
    packed examples apart is refused first."""
    packed = PackedCollator(collator, flatten=flattens(model))
    check(model, packed)
    return pack(examples, max_length), packed
