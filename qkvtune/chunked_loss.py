"""A causal LM's loss without its full-vocabulary logits: ``chunked_loss`` (on by default where exact).

A causal LM's forward turns the last hidden states (B×T×H) into logits (B×T×V) and cross-entropy reads them;
with a 49k–256k vocabulary those logits, their log-softmax and their gradient are the largest tensors of a
LoRA step, and of an evaluation batch. Here the LM head and the cross-entropy run a chunk of tokens at a time,
and only on the tokens that have a label (assistant turns, completions):

* forward: each chunk's logits → loss; when gradients are wanted, the chunk's logit gradient
  (softmax − one-hot)/n is formed at once and turned into the hidden states' gradient (and the head's, when it
  trains), so nothing V-wide outlives its chunk. Backward only scales those by the incoming gradient. This is
  the same arithmetic as the full-logits path (one head matmul forward, one for each gradient): the saving is
  memory, at no extra matmul (recomputing the logits in backward instead would add a head forward, ~10% of a
  SmolLM2 LoRA step).
* The numbers are transformers' own: labels shifted inside the sequence, ``-100`` ignored, the sum divided by
  Trainer's ``num_items_in_batch`` when given (gradient accumulation, several processes), else the mean; logits
  upcast to float32 before the softmax as ``ForCausalLMLoss`` does.

It plugs in through hooks, so the model's own forward runs (FSDP's unsharding, checkpointing, adapters): while
``ChunkedLoss.active()`` holds, a call with ``labels`` has them taken out, the LM head's input is turned into
the loss by a pre-hook that then hands the head an empty slice (so it computes B×0×V logits), and the loss is
put back into the model's output. Without labels (generation, ``predict``) nothing changes. ``loss_mismatch`` checks
on a tiny input that a model's loss really is cross-entropy of its head's output (no softcapping or scaling
after the head) before ``auto`` uses this.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import nn

from .errors import QkvtuneError, first_line

log = logging.getLogger(__name__)

IGNORE = -100
CHUNK_ELEMENTS = 1 << 23  # logits per chunk (32 MB in float32): ~170 tokens for a 49k vocabulary


class ChunkedLossError(QkvtuneError):
    """``chunked_loss: on`` for a model whose loss is not cross-entropy of its LM head's output."""


class _ChunkedCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(h·Wᵀ + b, target) · scale, chunk by chunk, with the gradients formed in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, rows, needs, dtype):
        # ``dtype``: the head's compute dtype (autocast's, if it was on): what lm_head(hidden) would compute in
        with torch.autocast(hidden.device.type, enabled=False):
            loss, *grads = _chunks(hidden, weight, bias, targets, scale, rows, needs, dtype)
        ctx.save_for_backward(*grads)
        ctx.dtypes = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        gh, gw, gb = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        scaled = lambda g, dtype: None if g is None else (g * grad.to(g.dtype)).to(dtype)
        return scaled(gh, hidden_dtype), scaled(gw, weight_dtype), scaled(gb, weight_dtype), *[None] * 5


def _chunks(hidden, weight, bias, targets, scale, rows, needs, dtype):
    """The loss and the gradients of hidden, weight and bias (None where not needed)."""
    h_all, w = hidden.to(dtype), weight.to(dtype)
    b = bias.to(dtype) if bias is not None else None
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    gh = torch.empty(hidden.shape, device=hidden.device, dtype=dtype) if needs[0] else None
    gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs[1] else None
    gb = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if needs[2] else None
    buf = None  # one float32 logits buffer for every chunk: a fresh one each time costs page faults on CPU
    for s in range(0, hidden.shape[0], rows):
        h, t = h_all[s:s + rows], targets[s:s + rows]
        if buf is None:
            buf = torch.empty(len(t), weight.shape[0], device=hidden.device, dtype=torch.float32)
        logits = buf[:len(t)]
        if dtype == torch.float32:
            torch.mm(h, w.t(), out=logits)
            if b is not None:
                logits += b
        else:  # the head in the compute dtype, the softmax in float32, as ForCausalLMLoss upcasts
            logits.copy_(F.linear(h, w, b))
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
        if not any(needs):
            continue
        g = logits.sub_(lse[:, None]).exp_()          # the softmax, in the logits' own memory
        g[torch.arange(len(t), device=g.device), t] -= 1.0
        g = g.mul_(scale).to(dtype)                   # autograd casts it back to the compute dtype too
        if gh is not None:
            torch.mm(g, w, out=gh[s:s + rows])
        if gw is not None:
            gw.addmm_(g.t().float(), h.float())
        if gb is not None:
            gb += g.float().sum(0)
    return total * scale, gh, gw, gb


def cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
                  num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``) of ``F.linear(hidden, weight, bias)`` without forming
    those logits: ``hidden`` (B, T, H), ``labels`` (B, T) unshifted. Gradients reach hidden, weight and bias."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(hidden.device)
    keep = targets != IGNORE
    h = hidden.reshape(-1, hidden.shape[-1])[keep]  # only tokens with a label cost a head matmul
    n = float(num_items_in_batch if num_items_in_batch is not None else keep.sum())
    scale = 1.0 / n if n else float("nan")          # nothing to learn: nan, as transformers' 0/0
    rows = max(1, CHUNK_ELEMENTS // weight.shape[0])
    grad = torch.is_grad_enabled()
    needs = tuple(grad and t is not None and t.requires_grad for t in (h, weight, bias))
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else torch.promote_types(
        hidden.dtype, weight.dtype)
    return _ChunkedCrossEntropy.apply(h, weight, bias, targets[keep], scale, rows, needs, dtype)


class ChunkedLoss:
    """The hooks that give ``model``'s forward the chunked loss while ``active()`` holds (see the module
    docstring). ``remove()`` takes them off again."""

    def __init__(self, model: nn.Module):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if not isinstance(head, nn.Linear):
            raise ChunkedLossError(f"chunked_loss: {type(model).__name__} has no linear LM head")
        self.model, self.head = model, head
        self.on, self.labels, self.items, self.loss = False, None, None, None
        self.handles = [model.register_forward_pre_hook(self._take_labels, with_kwargs=True),
                        head.register_forward_pre_hook(self._loss),
                        model.register_forward_hook(self._give_loss)]

    @contextlib.contextmanager
    def active(self, on: bool = True):
        was, self.on = self.on, on
        try:
            yield self
        finally:
            self.on, self.labels, self.items, self.loss = was, None, None, None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _take_labels(self, module, args, kwargs):
        if self.on and kwargs.get("labels") is not None and "shift_labels" not in kwargs:
            self.labels, self.items = kwargs.pop("labels"), kwargs.pop("num_items_in_batch", None)
            return args, kwargs
        return None

    def _loss(self, head, args):
        if self.labels is None or len(args) != 1:
            return None
        hidden = args[0]
        self.loss = cross_entropy(hidden, head.weight, head.bias, self.labels, self.items)
        self.labels = None
        return (hidden[..., :0, :],)  # the head computes B×0×V logits: nothing

    def _give_loss(self, module, args, output):
        if self.loss is None:
            return None
        loss, self.loss = self.loss, None
        if not hasattr(output, "items"):  # return_dict=False: a tuple, the loss first
            return (loss, *output)
        fields = {k: v for k, v in output.items() if k != "loss"}
        return type(output)(loss=loss, **fields)  # loss first, where Trainer and to_tuple() look for it


@torch.no_grad()
def loss_mismatch(model: nn.Module) -> str | None:
    """Why the chunked loss would not be ``model``'s own loss, or None when it is: on a tiny input (eval mode),
    the model's logits must be its LM head's raw output (nothing applied after the head) and its loss the
    chunked one (plain shifted cross-entropy)."""
    from .quant import is_quantized

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    name = type(model).__name__
    if not isinstance(head, nn.Linear) or is_quantized(head):
        return f"{name} has no plain linear LM head"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, head.out_features, (2, 6), generator=g).to(head.weight.device)
    labels = ids.clone()
    labels[0, :3] = IGNORE
    raw = []
    capture = head.register_forward_hook(lambda m, a, out: raw.append(out))
    hooks = ChunkedLoss(model)
    was = model.training
    model.eval()
    try:
        ref = model(input_ids=ids, labels=labels)
        with hooks.active():
            ours = model(input_ids=ids, labels=labels)
    except Exception as e:  # noqa: BLE001 - any failure means: not this model's loss
        return f"{name}: {first_line(e)}"
    finally:
        capture.remove()
        hooks.remove()
        model.train(was)
    if ref.loss is None or ours.loss is None:
        return f"{name} computes no loss from labels"
    if raw[0].shape[:-1] != ids.shape or not torch.equal(ref.logits.to(raw[0].dtype), raw[0]):
        return f"{name} changes its LM head's output before the loss (softcapping or scaling)"
    tol = 1e-5 if ref.loss.dtype == torch.float32 and head.weight.dtype == torch.float32 else 1e-2
    if not torch.allclose(ours.loss.float(), ref.loss.float(), rtol=tol, atol=tol):
        return f"{name}'s loss is not cross-entropy of its logits ({ref.loss.item():.6g} vs {ours.loss.item():.6g})"
    return None


def for_run(model: nn.Module, mode: str, task) -> ChunkedLoss | None:
    """``chunked_loss`` for a run: the hooks where the mode and the model allow them (``auto``: wherever the
    chunked loss is exactly the model's own; ``on``: refuse a model where it is not), else None."""
    if mode == "off" or not task.causal_lm:  # task: a TaskInfo
        if mode == "on":
            raise ChunkedLossError(f"chunked_loss: on is the loss of a causal LM's head; this task trains a {task.kind} model")
        return None
    why = loss_mismatch(model)
    if why is None:
        return ChunkedLoss(model)
    if mode == "on":
        raise ChunkedLossError(f"chunked_loss: {why}; use chunked_loss: off (or auto)")
    log.info("chunked_loss: auto keeps the full logits: %s", why)
    return None
