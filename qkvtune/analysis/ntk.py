"""Empirical neural tangent kernel (eNTK) at the current — usually pretrained — weights.

K_ij = ⟨∂f(x_i)/∂θ, ∂f(x_j)/∂θ⟩, θ = the weights of chosen attention slices (by kind q/k/v/o and layer)
or the delta parameters of an attached adapter; f = the logit margin, the logits (one kernel per
output, summed), a causal LM's label-word logits at its last real token, or any callable.

Per-example gradients come from one batched forward and one backward per output, never a per-example
loop: forward hooks keep each hooked projection's input X (B,T,in) and output Y, and autograd.grad of
Σ_b f_b with respect to the Y's gives every example's Δ_b = ∂f_b/∂Y_b (examples do not interact).

* projection weight: g_b = Δ_b[:, rows]ᵀ X_b (rows × in) — only the slice's rows of a fused projection;
* delta parameters (any method): g_b is the vector-Jacobian product of the delta's own forward with
  cotangent Δ_b[:, rows], vmapped over examples (vmap over a whole HF model fails in its mask code;
  over one small delta module it works), or looped when the delta's autograd.Function has no vmap rule.

Padding tokens get Δ = 0, so they contribute nothing. Gradients are stored per target, n × params (or
sketched to ``sketch_dim`` columns by a subsampled randomized Hadamard transform: n × k per target);
each chunk is multiplied only against itself and earlier chunks (the lower triangle of the Gram
matrix), in the gradients' dtype, and the blocks are summed in float64.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import AnalysisError
from ..attach import DeltaProjection, iter_deltas
from ..targets import Target


# --- spectrum summaries -------------------------------------------------------------------------------

@contextmanager
def few_threads(n: int):
    """One thread for small dense LAPACK problems: with 2+ threads right after a big parallel matmul, a
    256×256 eigvalsh was measured at 2.8 s instead of 0.01 s here (threads spinning against each other)."""
    saved = torch.get_num_threads()
    if n <= 2048:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def eigenvalues(kernel: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric kernel in float64, largest first."""
    k = kernel.double()
    with few_threads(len(k)):
        return torch.linalg.eigvalsh((k + k.T) / 2).flip(0)


def fit_decay(eigs: torch.Tensor, lo: int = 2, hi: int | None = None) -> tuple[float, tuple[int, int]]:
    """Exponent p of λ_i ≈ c·i^(−p): least squares of log λ_i on log i over 1-based indices lo..hi.

    Defaults: from i = 2 (the top eigenvalue of a pretrained kernel is usually an outlier, the shared
    direction of all examples) to ⌊n/2⌋ (the lower half is dominated by finite-n effects); eigenvalues
    ≤ 1e-12·λ₁ are dropped. Returns (p, (lo, hi)); p is NaN with fewer than 3 usable points.
    """
    e = eigs.double().sort(descending=True).values
    n = len(e)
    hi = min(n, hi or max(lo + 2, n // 2))
    i = torch.arange(lo, hi + 1, dtype=torch.float64)
    v = e[lo - 1:hi]
    keep = v > 1e-12 * max(float(e[0]), 0.0)
    if int(keep.sum()) < 3:
        return math.nan, (lo, hi)
    x, y = i[keep].log(), v[keep].log()
    slope = float(((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum())
    return -slope, (lo, hi)


def effective_dimension(eigs: torch.Tensor, ridge: float | None = None) -> float:
    """Participation ratio (Σλ)²/Σλ² (scale-free; = m for m equal eigenvalues), or with ``ridge`` the
    degrees of freedom of kernel ridge regression Σ λ/(λ + ridge)."""
    e = eigs.double().clamp_min(0)
    if ridge is not None:
        return float((e / (e + ridge)).sum())
    return float(e.sum() ** 2 / (e ** 2).sum()) if e.sum() > 0 else 0.0


# --- sketch ---------------------------------------------------------------------------------------------

def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh–Hadamard transform over the last dimension (a power of two)."""
    b, m = x.shape
    h = 1
    while h < m:
        x = x.view(b, m // (2 * h), 2, h)
        x = torch.stack((x[:, :, 0] + x[:, :, 1], x[:, :, 0] - x[:, :, 1]), dim=2)
        h *= 2
    return x.reshape(b, m)


class SRHT:
    """Subsampled randomized Hadamard transform S = √(m/k)·P·H·D (H orthonormal, D random signs, P picks
    k of m coordinates): E[SᵀS] = I, so sketched inner products are unbiased, and S embeds a fixed
    r-dimensional subspace about as well as a Gaussian k×dim matrix, at O(dim·log dim) per vector."""

    def __init__(self, dim: int, k: int, seed: int, device=None):
        self.dim, self.k = dim, k
        self.m = 1 << max(0, (dim - 1).bit_length())
        g = torch.Generator().manual_seed(seed)
        self.signs = (torch.randint(0, 2, (dim,), generator=g) * 2 - 1).to(device)
        self.rows = torch.randperm(self.m, generator=g)[:k].to(device)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x * self.signs.to(x.dtype), (0, self.m - self.dim))
        return _fwht(x).index_select(1, self.rows) / math.sqrt(self.k)


class KronSketch:
    """A Kronecker sketch of a per-example weight gradient G = Dᵀ X (out × in, D the output gradients and X the
    inputs over tokens): S_o G S_iᵀ = (D S_oᵀ)ᵀ (X S_iᵀ), with Gaussian S_o (k_o × out) and S_i (k_i × in),
    entries N(0, 1/k). E[S_oᵀS_o] = E[S_iᵀS_i] = I and the two are independent, so sketched inner products are
    unbiased: E⟨S_o G S_iᵀ, S_o H S_iᵀ⟩ = ⟨G, H⟩. The gradient is never formed: the cost is two thin products
    per token instead of an out×in outer product and a transform of it, which is what makes a large-n kernel
    cost about a training pass. Its variance is higher than a dense sketch of the same k_o·k_i coordinates
    (each factor contributes ~1/k) and heavy-tailed, so sketch_band does not apply to it: measured on MiniLM
    (n = 384, k = 4096), per-kind kernels off by 29–51 % in Frobenius norm against SRHT's 1–9 %, the plan's
    predicted scores moved by ≤ 0.04 (SRHT: ≤ 0.02)."""

    def __init__(self, out_features: int, in_features: int, k: int, seed: int, device=None):
        self.k_out = max(1, min(out_features, int(round(math.sqrt(k)))))
        self.k_in = max(1, min(in_features, k // self.k_out))
        g = torch.Generator().manual_seed(seed)
        self.s_out = (torch.randn(self.k_out, out_features, generator=g) / math.sqrt(self.k_out)).to(device)
        self.s_in = (torch.randn(self.k_in, in_features, generator=g) / math.sqrt(self.k_in)).to(device)

    def gradients(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """(B, k_out·k_in) sketched per-example gradients from inputs x (B,T,in) and output gradients d (B,T,out)."""
        dt = d.dtype
        if x.dim() == 2:
            x, d = x[:, None], d[:, None]
        return torch.einsum("bto,bti->boi", d @ self.s_out.to(dt).T, x.to(dt) @ self.s_in.to(dt).T).reshape(len(x), -1)


def sketch_band(rank: int, k: int, t: float = 3.0) -> tuple[float, float]:
    """Factors [lo, hi] bounding λ(sketched)/λ(exact) for every eigenvalue: if S embeds the kernel's
    r-dimensional row space with singular values in [1 − √(r/k) − t/√k, 1 + √(r/k) + t/√k] (Gaussian S:
    probability ≥ 1 − 2e^(−t²/2), Davidson–Szarek), Ostrowski's theorem gives λ̃_i = θ_i λ_i with θ_i in
    [lo, hi]. Kernels summed over targets keep the band (Loewner order). SRHT matches the Gaussian rate in
    practice; its proven bound carries extra log factors."""
    d = math.sqrt(rank / k) + t / math.sqrt(k)
    return max(0.0, 1 - d) ** 2, (1 + d) ** 2


# --- what is differentiated ----------------------------------------------------------------------------

@dataclass
class _Probe:
    name: str                      # "module[kind]"
    kind: str
    module: nn.Module              # hooked: the projection (weights) or its DeltaProjection (deltas)
    target: Target
    size: int                      # number of parameters
    delta: nn.Module | None = None
    wrapper: DeltaProjection | None = None

    def gradients(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-example gradients (B, size) from the layer input x (B,T,in) and output gradient d (B,T,out)."""
        d = self.target.outputs(d)
        if x.dim() == 2:  # a layer applied once per example (a pooler): one "token"
            x, d = x[:, None], d[:, None]
        if self.delta is None:
            return torch.einsum("bto,bti->boi", d, x.to(d.dtype)).reshape(len(x), -1)
        return _delta_vjp(self.delta, self.wrapper.slice_weight(self.target.rows).detach(), x, d)


def _delta_vjp(delta: nn.Module, w: torch.Tensor, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Per-example ∂⟨delta(x_b), d_b⟩/∂params, (B, params): vmapped, or looped over examples when the delta
    uses an autograd.Function that vmap cannot see through (SMT's block-sparse matmul)."""
    from torch.func import functional_call, grad, vmap

    names = [n for n, _ in delta.named_parameters()]
    params = {n: p.detach() for n, p in delta.named_parameters()}

    def contribution(p, xb, db):
        base_out = F.linear(xb.to(w.dtype), w) if delta.needs_base_out else None
        return (functional_call(delta, p, (xb, base_out, w)) * db).sum()

    if not getattr(type(delta), "_no_vmap", False):
        try:
            g = vmap(grad(contribution), in_dims=(None, 0, 0))(params, x, d)
            return torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)
        except RuntimeError:
            type(delta)._no_vmap = True  # remember: go straight to the loop next time
    rows = []
    with torch.enable_grad():
        leaves = {n: p.clone().requires_grad_() for n, p in params.items()}
        for xb, db in zip(x, d):
            g = torch.autograd.grad(contribution(leaves, xb, db), list(leaves.values()), allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1)
                                   for gi, p in zip(g, leaves.values())]))
    return torch.stack(rows)


class _HeadProbe:
    """A task head's linear layer, whole (weight and bias), as kind ``head``: what the real run trains beside its
    slices. Its input is the pooled feature (B, in) of a sequence classifier, or (B, T, in)."""

    target = None
    delta = wrapper = None

    def __init__(self, name: str, module: nn.Linear):
        self.name, self.kind, self.module = f"{name}[head]", HEAD_KIND, module
        self.size = module.weight.numel() + (module.bias.numel() if module.bias is not None else 0)

    def gradients(self, x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:
            x, d = x[:, None], d[:, None]
        g = torch.einsum("bto,bti->boi", d, x.to(d.dtype)).reshape(len(x), -1)
        return torch.cat([g, d.sum(1)], 1) if self.module.bias is not None else g


HEAD_KIND = "head"


def head_probes(model: nn.Module, heads: list[str]) -> list[_HeadProbe]:
    """Every Linear inside the named head modules (a classifier's ``classifier``; RoBERTa's dense + out_proj)."""
    out = []
    for h in heads:
        for name, module in model.get_submodule(h).named_modules():
            if isinstance(module, nn.Linear):
                out.append(_HeadProbe(f"{h}.{name}" if name else h, module))
    if heads and not out:
        raise AnalysisError(f"heads: no Linear layer in {heads}")
    return out


def probes(model: nn.Module, targets: list[Target] | None = None, adapter: str | None = None,
           heads: list[str] | None = None) -> list[_Probe]:
    """The parameter blocks θ is made of. ``adapter=None``: the base weights of ``targets`` (the run's
    resolved slices) and, with ``heads``, those heads' linear layers whole (kind ``head``); else the delta
    parameters of that adapter (only those on ``targets`` when given)."""
    if adapter is None:
        if not targets:
            raise AnalysisError("targets: the kernel needs at least one slice")
        return [_Probe(t.name, t.kind, t.projection(model), t, t.rows.size * t.in_features) for t in targets] + \
            head_probes(model, heads or [])
    pairs = list(iter_deltas(model, adapter))
    if not pairs:
        raise AnalysisError(f"adapter: the model has no adapter named {adapter!r}")
    if targets is not None:
        wanted = {(t.module, t.kind) for t in targets}
        pairs = [(w, d) for w, d in pairs if (d.target.module, d.kind) in wanted]
    if not pairs:
        raise AnalysisError(f"targets: adapter {adapter!r} has no delta on {[t.name for t in targets]}")
    return [_Probe(d.target.name, d.kind, w, d.target, sum(p.numel() for p in d.parameters()), delta=d, wrapper=w)
            for w, d in pairs]


class _Capture:
    """Forward hooks that keep each hooked module's input and (differentiable) output."""

    def __init__(self, modules):
        self.x, self.y = {}, {}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, inputs, output):
        # With every weight frozen the first hooked output has no history: make it the leaf gradients reach.
        y = output if output.requires_grad else output.detach().requires_grad_()
        self.x[module], self.y[module] = inputs[0].detach(), y
        return y.clone()  # a wrapper adds its deltas to some rows in place: y itself must stay untouched

    def remove(self):
        for h in self.handles:
            h.remove()


@contextmanager
def _analysis_mode(model: nn.Module):
    """Eval mode (no dropout) and every parameter frozen, so backward computes activation gradients only."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    training = model.training
    for p, _ in flags:
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
        model.train(training)


# --- data and outputs ----------------------------------------------------------------------------------

def _chunks(data, collator, chunk_size: int, sort_by_length: bool):
    """(example indices, batch dict) pairs. ``data``: a dict of (n, …) tensors, or examples + collator."""
    if isinstance(data, dict):
        n = len(next(iter(data.values())))
        for s in range(0, n, chunk_size):
            yield list(range(s, min(n, s + chunk_size))), {k: v[s:s + chunk_size] for k, v in data.items()}
        return
    if collator is None:
        raise AnalysisError("collator: needed when data is a list of examples (a dict of tensors needs none)")
    n = len(data)
    order = list(range(n))
    if sort_by_length:  # less padding per chunk; the kernel is put back in the original order
        order.sort(key=lambda i: len(data[i]["input_ids"]))
    for s in range(0, n, chunk_size):
        idx = order[s:s + chunk_size]
        yield idx, collator([data[i] for i in idx])


def model_outputs(model_out, batch: dict, output="margin", label_token_ids=None) -> torch.Tensor:
    """f for a batch as (B, C): ``margin`` = logit₁ − logit₀ (two outputs), ``logits`` = all of them; a causal
    LM's logits are taken at the last real token and restricted to ``label_token_ids``. A callable gets
    (model output, batch) and returns (B,) or (B, C)."""
    if callable(output):
        f = output(model_out, batch)
        return f.reshape(len(f), -1)
    logits = model_out.logits
    if logits.dim() == 3:
        if label_token_ids is None:
            raise AnalysisError("label_token_ids: a causal LM needs the label words' token ids")
        mask = batch.get("attention_mask")
        t = logits.shape[1]
        pos = torch.arange(t, device=logits.device)
        last = (mask * pos).argmax(1) if mask is not None else torch.full((len(logits),), t - 1, device=logits.device)
        logits = logits[torch.arange(len(logits), device=logits.device), last][:, list(label_token_ids)]
    if output == "logits":
        return logits
    if output == "margin":
        if logits.shape[-1] != 2:
            raise AnalysisError(f"output: 'margin' needs 2 outputs, the model has {logits.shape[-1]}; use 'logits'")
        return (logits[:, 1] - logits[:, 0])[:, None]
    raise AnalysisError(f"output: {output!r} is not margin, logits or a callable")


def outputs(model: nn.Module, examples: list, collator, output: str | Callable = "margin", label_token_ids=None,
            batch_size: int = 32) -> torch.Tensor:
    """f (as ``model_outputs``) of ``model`` on ``examples`` in evaluation mode without gradients, (N, C) float64:
    the kernel's f₀ at other weights (a trained run, one real step)."""
    from ..inference import batches, forward

    return forward(model, batches(examples, collator, batch_size),
                   lambda out, batch: model_outputs(out, batch, output, label_token_ids).double())


def label_word_examples(examples: list, label_token_ids: list[int]) -> tuple[list[dict], int]:
    """A causal LM's supervised examples as prompt-based classification (Malladi et al.'s kernel view): each
    example cut just before the first response token (labels ≠ -100) that is one of the label words' tokens,
    with that word's index as its class label; the model's f is then the label words' logits at the last
    token (``model_outputs``). Returns the examples and how many had no label word in their response."""
    index = {t: i for i, t in enumerate(label_token_ids)}
    out, dropped = [], 0
    for ex in examples:
        ids, labels = list(ex["input_ids"]), list(ex["labels"])
        pos = next((j for j, (t, l) in enumerate(zip(ids, labels)) if l != -100 and t in index and j > 0), None)
        if pos is None:
            dropped += 1
            continue
        out.append({"input_ids": ids[:pos], "attention_mask": [1] * pos, "labels": index[ids[pos]]})
    return out, dropped


def token_examples(examples: list, count: int, seed: int = 0) -> tuple[list[dict], list[int]]:
    """A causal LM's trained tokens as the kernel's points (its language-model loss, token by token): ``count``
    tokens drawn (seeded, without replacement) from every trained token of ``examples`` pooled (labels ≠ -100,
    not the first position), so each token is as likely as it is in the loss; each point is its example cut just
    after that token, and ``token_margin`` reads it. Returns the points, in the examples' order, and the index of
    the example each came from."""
    import random

    pool = [(i, j) for i, ex in enumerate(examples) for j, lab in enumerate(ex["labels"]) if j > 0 and lab != -100]
    if not pool:
        raise AnalysisError("examples: no trained token (every label is -100)")
    chosen = sorted(random.Random(f"token_examples:{seed}").sample(pool, min(count, len(pool))))
    points = [{"input_ids": list(examples[i]["input_ids"][:j + 1]), "attention_mask": [1] * (j + 1)} for i, j in chosen]
    return points, [i for i, _ in chosen]


def token_margin(model_out, batch: dict) -> torch.Tensor:
    """The language-model loss of each point's last token y as a margin: u = z_y − log Σ_{k≠y} e^{z_k} from the
    logits z at the position before it, so that token's cross-entropy is exactly softplus(−u) — a two-class
    logistic loss on one scalar, which is what the kernel linearises. (B, 1). Reads ``logits_to_keep`` when the
    collator asked the model for those positions only (``KeepLogits``)."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    rows = torch.arange(len(ids), device=ids.device)
    last = (mask * torch.arange(ids.shape[1], device=ids.device)).argmax(1)
    target = ids[rows, last]
    keep = batch.get("logits_to_keep")
    col = torch.searchsorted(keep, last - 1) if isinstance(keep, torch.Tensor) else last - 1
    z = model_out.logits[rows, col].float()
    zy = z.gather(1, target[:, None])[:, 0]
    others = z.scatter(1, target[:, None], -math.inf).logsumexp(1)
    return (zy - others)[:, None]


class KeepLogits:
    """Wraps a collator so a causal LM computes logits only where ``token_margin`` reads them (the position
    before each row's last token), not over the whole vocabulary at every position."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        mask = batch["attention_mask"]
        last = (mask * torch.arange(mask.shape[1])).argmax(1)
        batch["logits_to_keep"] = torch.unique(last - 1)  # sorted
        return batch


# --- the kernel -----------------------------------------------------------------------------------------

@dataclass
class NTKResult:
    kernel: torch.Tensor                      # (n, n) float64; summed over targets (and outputs)
    per_kind: dict[str, torch.Tensor]         # kind -> (n, n); any union is a sum of these
    per_target: dict[str, torch.Tensor]       # "module[kind]" -> (n, n)
    per_output: torch.Tensor | None           # (C, n, n) for a vector f, else None
    eigenvalues: torch.Tensor                 # of ``kernel``, largest first
    decay_exponent: float                     # p in λ_i ≈ c·i^(−p)
    decay_range: tuple[int, int]
    effective_dim: float                      # participation ratio (Σλ)²/Σλ²
    f0: torch.Tensor                          # (n, C) outputs at these weights
    labels: torch.Tensor | None
    meta: dict = field(default_factory=dict)

    def label_targets(self, scale: float = 1.0) -> torch.Tensor:
        """The regression targets of these examples' labels for outputs shaped like ``f0``."""
        if self.labels is None:
            raise AnalysisError("labels: the kernel was computed without per-example labels")
        return label_targets(self.labels, self.f0.shape[1], scale)

    def summary(self) -> dict:
        return {"n": len(self.kernel), "eigenvalues": self.eigenvalues.tolist(),
                "decay_exponent": self.decay_exponent, "decay_range": list(self.decay_range),
                "rate_exponent": rate_from_decay(self.decay_exponent), "effective_dim": self.effective_dim,
                "trace": float(self.kernel.trace()),
                "per_kind_trace": {k: float(v.trace()) for k, v in self.per_kind.items()}, **self.meta}

    def subset(self, idx) -> "NTKResult":
        """The same analysis restricted to examples ``idx`` (e.g. the training part of train + eval)."""
        idx = torch.as_tensor(list(idx))
        pick = lambda k: k.index_select(-2, idx).index_select(-1, idx)  # noqa: E731
        kernel = pick(self.kernel)
        eigs = eigenvalues(kernel)
        p, rng = fit_decay(eigs, self.decay_range[0])
        return NTKResult(kernel, {k: pick(v) for k, v in self.per_kind.items()},
                         {k: pick(v) for k, v in self.per_target.items()},
                         None if self.per_output is None else pick(self.per_output), eigs, p, rng,
                         effective_dimension(eigs), self.f0[idx], None if self.labels is None else self.labels[idx],
                         dict(self.meta))

    def save(self, out_dir: str, name: str = "ntk") -> dict:
        """``name``.json (summary), ``name``_spectrum.png, ``name``_kernel.safetensors (kernels, f0, labels;
        safetensors so reading them back never unpickles anything)."""
        import os

        from .plots import plot_spectrum
        from ..files import write_json

        os.makedirs(out_dir, exist_ok=True)
        summary = self.summary()
        write_json(os.path.join(out_dir, f"{name}.json"), summary)
        per_kind = {k: eigenvalues(v) for k, v in self.per_kind.items()} if len(self.per_kind) > 1 else None
        plot_spectrum(self.eigenvalues, self.decay_exponent, self.decay_range,
                      os.path.join(out_dir, f"{name}_spectrum.png"), per_kind=per_kind)
        from safetensors.torch import save_file

        tensors = {"kernel": self.kernel, "f0": self.f0, **{f"per_kind.{k}": v for k, v in self.per_kind.items()}}
        if self.per_output is not None:
            tensors["per_output"] = self.per_output
        if self.labels is not None:
            tensors["labels"] = self.labels
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                  os.path.join(out_dir, f"{name}_kernel.safetensors"))
        return summary


def label_targets(labels: torch.Tensor, n_outputs: int, scale: float = 1.0) -> torch.Tensor:
    """The one label → regression-target mapping of the kernel tools, (n, n_outputs) float64: float labels
    (regression) as they are; class labels as ±``scale`` for a single margin output, else ``scale``·one-hot."""
    if labels.is_floating_point():
        return labels.double().reshape(len(labels), -1)
    if n_outputs == 1:
        return (2.0 * labels.double() - 1.0)[:, None] * scale
    return torch.nn.functional.one_hot(labels.long(), n_outputs).double() * scale


def rate_from_decay(p: float) -> float:
    """λ_i ≍ i^(−2α) (p = 2α) gives excess risk ≍ n^(−2α/(2α+1)) (RWY 2014): returns p/(p+1)."""
    return p / (p + 1) if p == p and p > 0 else math.nan


def empirical_ntk(model: nn.Module, data, targets: list[Target] | None = None, *, collator=None,
                  adapter: str | None = None, heads: list[str] | None = None,
                  output: str | Callable = "margin", label_token_ids=None, sketch_dim: int | None = None,
                  sketch: str = "srht",
                  chunk_size: int = 16, dtype=torch.float64, seed: int = 0, sort_by_length: bool = True,
                  fit_range: tuple[int, int | None] = (2, None)) -> NTKResult:
    """The eNTK of ``model`` on ``data`` (a dict of (n, …) tensors, or a list/Dataset of examples with a
    ``collator``), over θ = the base weights of ``targets`` (a run's resolved slices, ``Run.targets``) or the
    delta parameters of ``adapter``; ``heads``: also these task heads' linear layers, whole (kind ``head``).

    ``output``: "margin" | "logits" | callable(model_output, batch) -> (B,) or (B, C). ``sketch_dim``: keep k
    SRHT coordinates per target instead of the whole gradient (see ``sketch_band`` for the eigenvalue
    error); ``sketch="kron"``: a Kronecker sketch of √k × √k (``KronSketch``; base weights only), which never
    forms the gradient. Examples are processed ``chunk_size`` at a time; Gram blocks are summed in ``dtype``.
    """
    if chunk_size < 1:
        raise AnalysisError(f"chunk_size: must be >= 1, got {chunk_size}")
    if sketch_dim is not None and sketch_dim < 1:
        raise AnalysisError(f"sketch_dim: must be >= 1, got {sketch_dim}")
    blocks = probes(model, targets, adapter, heads)
    device = next(model.parameters()).device
    if sketch not in ("srht", "kron"):
        raise AnalysisError(f"sketch: expected srht or kron, got {sketch!r}")
    if sketch == "kron" and adapter is not None:
        raise AnalysisError("sketch: kron sketches base-weight gradients; use srht for an adapter's parameters")
    make = lambda i, p: KronSketch(p.target.rows.size, p.target.in_features, sketch_dim, seed + i, device) \
        if sketch == "kron" and p.target is not None else SRHT(p.size, sketch_dim, seed + i, device)  # noqa: E731
    sketches = {p.name: make(i, p) for i, p in enumerate(blocks) if sketch_dim is not None and sketch_dim < p.size}
    modules = list(dict.fromkeys(p.module for p in blocks))
    n = len(next(iter(data.values()))) if isinstance(data, dict) else len(data)
    feats: dict[tuple[str, int], torch.Tensor] = {}  # (target, output) -> (n, width) gradients, chunk order
    per_target = {p.name: torch.zeros(n, n, dtype=dtype) for p in blocks}  # lower triangles, chunk order
    per_out: dict[int, torch.Tensor] = {}
    order, f0, labels = [], [], []
    start = time.perf_counter()
    with _analysis_mode(model):
        capture = _Capture(modules)
        try:
            for idx, batch in _chunks(data, collator, chunk_size, sort_by_length):
                batch = {k: v.to(device) for k, v in batch.items()}
                y = batch.pop("labels", None)
                if y is not None and y.dim() == 1:
                    labels.append(y.cpu())
                f = model_outputs(model(**batch), batch, output, label_token_ids)
                f0.append(f.detach().double().cpu())
                r0, r1 = len(order), len(order) + len(idx)
                order += idx
                mask = batch.get("attention_mask")
                for c in range(f.shape[1]):
                    outs = [capture.y[m] for m in modules]
                    grads = torch.autograd.grad(f[:, c].sum(), outs, retain_graph=c + 1 < f.shape[1], allow_unused=True)
                    grads = {m: torch.zeros_like(o) if g is None else g for m, o, g in zip(modules, outs, grads)}
                    k_out = per_out.setdefault(c, torch.zeros(n, n, dtype=dtype))
                    for p in blocks:
                        d = grads[p.module]
                        if mask is not None and d.dim() == 3 and mask.shape == d.shape[:2]:
                            d = d * mask[..., None].to(d.dtype)  # padding tokens contribute nothing
                        sk = sketches.get(p.name)
                        if isinstance(sk, KronSketch):  # sketched before the gradient is ever formed
                            g = sk.gradients(capture.x[p.module], p.target.outputs(d)).detach()
                        else:
                            g = p.gradients(capture.x[p.module], d).detach()
                            if sk is not None:
                                g = sk(g)
                        store = feats.get((p.name, c))
                        if store is None:
                            store = feats[p.name, c] = g.new_empty(n, g.shape[1])
                        store[r0:r1] = g
                        # this chunk against itself and every earlier one: the lower triangle, half the work
                        block = (g @ store[:r1].T).to(dtype).cpu()
                        per_target[p.name][r0:r1, :r1] += block
                        k_out[r0:r1, :r1] += block
                capture.x.clear()
                capture.y.clear()
        finally:
            capture.remove()
    feats.clear()
    n_out = f0[0].shape[1]
    inv = torch.argsort(torch.tensor(order))

    def full(k):  # mirror the lower triangle, back to the caller's order
        low = k.tril()
        return (low + low.tril(-1).T)[inv][:, inv]

    per_target = {name: full(k) for name, k in per_target.items()}
    per_output = torch.stack([full(per_out[c]) for c in range(n_out)])
    per_kind: dict[str, torch.Tensor] = {}
    for p in blocks:
        per_kind[p.kind] = per_kind.get(p.kind, 0) + per_target[p.name]
    kernel = per_output.sum(0)
    eigs = eigenvalues(kernel)
    p_exp, rng = fit_decay(eigs, *fit_range)
    meta = {"kinds": sorted(per_kind), "targets": [p.name for p in blocks], "adapter": adapter,
            "parameters": sum(p.size for p in blocks), "sizes": {p.name: p.size for p in blocks}, "outputs": n_out,
            "output": output if isinstance(output, str) else getattr(output, "__name__", "callable"),
            "sketch_dim": sketch_dim, "sketch": sketch if sketches else None, "seconds": time.perf_counter() - start}
    if sketches and sketch == "srht":
        meta["sketch_band"] = list(sketch_band(min(n, max(s.dim for s in sketches.values())), sketch_dim))
    return NTKResult(kernel, per_kind, per_target, per_output if n_out > 1 else None, eigs, p_exp, rng,
                     effective_dimension(eigs), torch.cat(f0)[inv],
                     torch.cat(labels)[inv] if len(labels) and sum(map(len, labels)) == n else None, meta)
