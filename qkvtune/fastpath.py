"""The fast path: the same training step with less work, switched on by ``fast_path`` in the config.

On CPU a BERT-style training step spends ~30% of its time in ``aten::bernoulli_``: drawing the dropout
masks of the hidden states and of the attention probabilities (p = 0.1), more than half of what its
matrix work costs. ``torch.compile`` made it slower there. So on CPU the fast path replaces only the
random-number generation:

* ``keep_mask``: full-range random 64-bit words viewed as four 16-bit lanes; a lane keeps its element
  when it is ≥ round(p·2¹⁶). Every bit of the words is uniform (``random_`` over the full int64 range
  draws all 64 bits; tests check each bit and lane), so the keep probability is 1 − round(p·2¹⁶)/2¹⁶,
  within 2⁻¹⁷ of 1 − p. The kept values are scaled by 1/(1 − p) exactly as ``nn.Dropout`` does, so the
  fast dropout has eager dropout's distribution up to that rounding of p. It draws from the same global
  torch generator (seeded runs stay reproducible) but a different stream: masks, and so results,
  differ from eager ones for the same seed; in eval mode or at p = 0 nothing changes at all.
* ``FastDropout`` replaces every ``nn.Dropout`` with p > 0 (hidden, embedding, classifier, LoRA path).
* The attention-probability dropout happens inside transformers' attention function; ``fast_attention``
  is registered through ``AttentionInterface`` and, in training with dropout, computes softmax(QKᵀ)·V
  with a fast mask (the 1/(1 − p) scale is applied to the smaller output). Without dropout it calls the
  model's original implementation (sdpa or eager), so eval-mode logits are bit-for-bit the eager ones.

On CUDA random numbers are cheap and the natural fast path is ``torch.compile``: ``enable(model,
compile=True)`` compiles the model in place (``nn.Module.compile``: module names, state dicts, merge and
unmerge are unchanged). Compiling costs start-up time and a recompile per new padded length, so it is
only used with ``fast_path: on``. Models without dropout (Llama, SmolLM2) get nothing from the CPU path.

    fastpath.enable(model)       # what fast_path: on|auto does on a CPU
    fastpath.disable(model)      # back to eager
"""

from __future__ import annotations

import torch
from torch import nn

LANES = 4            # 16-bit lanes per random 64-bit word
LANE_LEVELS = 1 << 16
ATTENTION_PREFIX = "qkvtune_fast_"
BASE_ATTENTION = ("sdpa", "eager")   # implementations the fast attention knows how to fall back to


def keep_threshold(p: float) -> int:
    """Signed 16-bit lanes at or above this value are kept: P(keep) = 1 − round(p·2¹⁶)/2¹⁶."""
    return round(p * LANE_LEVELS) - LANE_LEVELS // 2


def keep_mask(shape, p: float, device=None) -> torch.Tensor:
    """A bool mask with P(True) = 1 − p (to within 2⁻¹⁷), from cheap full-range integer random words."""
    n = 1
    for s in shape:
        n *= s
    words = torch.empty(-(-n // LANES), dtype=torch.int64, device=device).random_(-2**63, None)
    lanes = words.view(torch.int16)
    if lanes.numel() != n:
        lanes = lanes[:n]
    return (lanes >= keep_threshold(p)).view(shape)


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask from ``keep_mask``."""
    if not training or p == 0:
        return x
    if p == 1:
        return torch.zeros_like(x)
    return torch.where(keep_mask(x.shape, p, x.device), x * (1.0 / (1.0 - p)), 0.0)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, same eval behaviour) drawing its mask with ``keep_mask``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_dropout(x, self.p, self.training)


def _causal_or_given_mask(scores: torch.Tensor, attention_mask, is_causal: bool) -> torch.Tensor:
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:  # sdpa style: True = attend
            return scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        return scores + attention_mask[..., : scores.shape[-1]]  # eager style: additive
    if is_causal and scores.shape[-2] > 1:
        q, k = scores.shape[-2:]
        future = torch.ones(q, k, dtype=torch.bool, device=scores.device).triu(k - q + 1)
        return scores.masked_fill(future, torch.finfo(scores.dtype).min)
    return scores


def _attention_with_fast_dropout(module, query, key, value, attention_mask, dropout: float,
                                 scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """Eager attention (scores, mask, softmax, dropout, ·V) with the dropout mask from ``keep_mask``."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # grouped-query attention: each key/value head serves ``groups`` query heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    causal = getattr(module, "is_causal", False) if is_causal is None else is_causal
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    probs = torch.softmax(_causal_or_given_mask(scores, attention_mask, causal), dim=-1, dtype=torch.float32)
    probs = probs.to(query.dtype)
    kept = torch.where(keep_mask(probs.shape, dropout, probs.device), probs, 0.0)
    out = torch.matmul(kept, value) * (1.0 / (1.0 - dropout))  # (P∘M/(1−p))·V = ((P∘M)·V)/(1−p)
    return out.transpose(1, 2).contiguous(), None


def _make_fast_attention(base: str):
    def fast_attention(module, query, key, value, attention_mask, dropout: float = 0.0, **kwargs):
        if dropout > 0 and module.training:
            return _attention_with_fast_dropout(module, query, key, value, attention_mask, dropout, **kwargs)
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        if base == "eager":  # each model has its own eager function; the module's own file has it
            import sys

            eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
            return eager(module, query, key, value, attention_mask, dropout=dropout, **kwargs)
        return ALL_ATTENTION_FUNCTIONS[base](module, query, key, value, attention_mask, dropout=dropout, **kwargs)

    fast_attention.__name__ = ATTENTION_PREFIX + base
    return fast_attention


def _set_attention(model: nn.Module, name: str) -> None:
    from transformers import AttentionInterface

    if name.startswith(ATTENTION_PREFIX):
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

        base = name[len(ATTENTION_PREFIX):]
        AttentionInterface.register(name, _make_fast_attention(base))
        # the padding mask must be built as for the base implementation: an unknown name gets another
        # mask format, and padded batches then attend differently (eval logits would change)
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    model.set_attn_implementation(name)


def enable(model: nn.Module, compile: bool = False) -> list[str]:
    """Turn the fast path on in place; returns what it changed (empty: nothing to speed up here).

    ``compile`` (CUDA): ``model.compile()`` in place instead of the CPU dropout path."""
    if getattr(model, "qkvtune_fastpath", None):
        return list(model.qkvtune_fastpath["changed"])
    state = {"changed": [], "dropouts": [], "attention": None, "compiled": False}
    if compile:
        model.compile()
        state["compiled"] = True
        state["changed"].append("torch.compile")
    else:
        for name, m in list(model.named_modules()):
            for child_name, child in list(m.named_children()):
                if type(child) is nn.Dropout and child.p > 0:
                    fast = FastDropout(child.p, child.inplace)
                    fast.train(child.training)
                    setattr(m, child_name, fast)
                    state["dropouts"].append((m, child_name, child))
        if state["dropouts"]:
            state["changed"].append(f"{len(state['dropouts'])} dropout modules")
        config = getattr(model, "config", None)
        # transformers keeps the selected attention implementation only under this name (no public getter in 5.x)
        current = getattr(config, "_attn_implementation", None)
        p_attn = max((getattr(config, k, 0.0) or 0.0 for k in ("attention_probs_dropout_prob", "attention_dropout",
                                                               "attn_pdrop")), default=0.0)
        if current in BASE_ATTENTION and p_attn > 0 and hasattr(model, "set_attn_implementation"):
            _set_attention(model, ATTENTION_PREFIX + current)
            state["attention"] = current
            state["changed"].append(f"attention {current} -> {ATTENTION_PREFIX + current}")
    model.qkvtune_fastpath = state
    return list(state["changed"])


def disable(model: nn.Module) -> None:
    """Undo ``enable``: the original dropout modules and attention implementation come back."""
    state = getattr(model, "qkvtune_fastpath", None)
    if not state:
        return
    for parent, child_name, original in state["dropouts"]:
        original.train(getattr(parent, child_name).training)
        setattr(parent, child_name, original)
    if state["attention"]:
        _set_attention(model, state["attention"])
    if state["compiled"]:
        model._compiled_call_impl = None  # what nn.Module.compile set
    del model.qkvtune_fastpath


def resolve(mode: str, cuda: bool | None = None) -> dict | None:
    """What ``fast_path: auto|on|off`` means here: None (eager) or the keyword arguments of ``enable``.

    auto: the CPU dropout path (exact up to the documented RNG difference, no start-up cost); eager on
    CUDA. on: the same on CPU, ``torch.compile`` on CUDA. off: eager everywhere."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if mode == "off" or (mode == "auto" and cuda):
        return None
    return {"compile": cuda}
