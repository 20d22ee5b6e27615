"""The model's own q, k and v, read from its real forward pass through public API only.

A test that takes its reference from a private method of transformers (``FalconAttention._split_heads``) breaks
on the next release while the library stays right. Here the reference is what the attention computation
itself receives:
- ``interface``: models that dispatch through transformers' ``AttentionInterface`` run a registered capturing
  attention function (selected with the public ``set_attn_implementation``), which records q, k, v and then
  computes SDPA attention;
- ``products``: models with hand-written eager attention (Bloom, MPT) run under a ``TorchFunctionMode`` that
  records the operands of the first two batched products inside the attention module: q·kᵀ, then probs·v.
Position ids are all zero, so rotary embeddings are the identity (cos 0 = 1, sin 0 = 0) and q, k arrive
exactly as the projection made them.
"""

import torch
from torch.overrides import TorchFunctionMode
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

CAPTURE = "qkvtune_capture"
_received: list = []


def _capture(module, query, key, value, attention_mask, **kwargs):
    _received.append((module, query, key, value))
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE, _capture)
AttentionMaskInterface.register(CAPTURE, sdpa_mask)

_PRODUCTS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm}
_ADD_PRODUCTS = {torch.baddbmm, torch.Tensor.baddbmm}  # (input, batch1, batch2)


class _Products(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.active, self.operands = False, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.active and func in _PRODUCTS:
            self.operands.append((args[0], args[1]))
        elif self.active and func in _ADD_PRODUCTS:
            rest = list(args[1:])
            self.operands.append((kwargs.get("batch1", rest[0] if rest else None),
                                  kwargs.get("batch2", rest[1] if len(rest) > 1 else None)))
        return func(*args, **kwargs)


def _heads(t, batch):
    """(batch·heads, seq, d) or (batch, heads, seq, d) → (batch, heads, seq, d)."""
    return t.unflatten(0, (batch, -1)) if t.dim() == 3 else t


def own_qkv(model, attention: torch.nn.Module, input_ids: torch.Tensor, route: str):
    """(q, k, v) as ``attention`` (a module of ``model``) receives them in the model's own forward on
    ``input_ids``: each (batch, heads, seq, head_dim), k and v with their own (kv-)head count."""
    batch = input_ids.shape[0]
    if route == "interface":
        model.set_attn_implementation(CAPTURE)
        _received.clear()
        with torch.no_grad():
            model(input_ids=input_ids, position_ids=torch.zeros_like(input_ids))
        q, k, v = next((q, k, v) for m, q, k, v in _received if m is attention)
        return q, k, v
    assert route == "products", route
    mode = _Products()

    def on(*_):
        mode.active = True

    def off(*_):
        mode.active = False

    handles = [attention.register_forward_pre_hook(on), attention.register_forward_hook(off)]
    try:
        with mode, torch.no_grad():
            model(input_ids=input_ids)
    finally:
        for h in handles:
            h.remove()
    (q, k_t), (_, v) = mode.operands[:2]
    return _heads(q, batch), _heads(k_t, batch).transpose(-1, -2), _heads(v, batch)
