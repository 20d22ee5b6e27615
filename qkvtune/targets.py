"""Find the attention and MLP projections of a Hugging Face model and name their slices by role.

The matrix kinds (``MATRIX_KINDS``, defined here once): attention q, k, v, o and MLP gate, up, down. MLP kinds go by
what the block does with each output, whatever the model calls it: ``up`` is the input projection of the MLP
(of a gated MLP, the linear branch), ``gate`` the branch a gated MLP passes through its activation before
multiplying (down(act(gate(x)) · up(x)), as Llama's ``gate_proj``), ``down`` the projection back to the
hidden size.

A *target* is one slice of one projection: the module path, the matrix kind, the layer index and the
set of output rows that belong to the slice. Separate projections (BERT ``query``, Llama ``q_proj``) are
one slice covering every row; fused projections hold several slices side by side:

* GPT-2 ``c_attn`` (a ``Conv1D``, weight stored in×out): q, k, v are the column ranges [0,d), [d,2d), [2d,3d).
  GPT-BigCode's ``c_attn`` (a Linear) by its config: multi-query [q | one k head | one v head], else per head.
* GPT-NeoX ``query_key_value``: outputs laid out per head as (n_heads, 3, head_dim), so q is a strided set.
* Phi-3 ``qkv_proj``: [q | k | v] contiguous, k and v narrower under grouped-query attention.
* ModernBERT and MPT ``attn.Wqkv``: [q | k | v] thirds. Bloom ``self_attention.query_key_value``: per head,
  as GPT-NeoX. Falcon's: grouped, per head or multi-query, by its config (``_falcon_rows``).
* Separate projections also cover DeBERTa-v2/v3 (``query_proj``…), Phi-2 (``dense`` as o), ModernBERT's
  ``attn.Wo``, Falcon/Bloom's ``self_attention.dense``.
* MLPs (``_MLP``): Phi-3's ``mlp.gate_up_proj`` is [gate | up] halves, and so is ModernBERT's ``mlp.Wi``, whose
  first half (``input`` in its code) goes through the activation and is therefore the gate here.

Rows are kept as a compact, JSON-friendly ``Rows(start, width, stride, count)``: the index set
``{start + p*stride + j : p < count, j < width}``; a contiguous range has ``count == 1``.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import QkvtuneError
from .quant import QuantizeError, dequantized, is_quantized

ATTENTION_KINDS = ("q", "k", "v", "o")
MLP_KINDS = ("gate", "up", "down")
MATRIX_KINDS = ATTENTION_KINDS + MLP_KINDS
GROUPS = {"mlp": MLP_KINDS}  # a name for several kinds in targets / smt_targets: those of them the model has
ALL_LINEAR = "all-linear"    # PEFT's target_modules="all-linear": every linear layer but the output layer and heads
HEAD_NAMES = ("pre_classifier", "classifier", "score", "qa_outputs")  # task heads: trained whole, never sliced


class TargetError(QkvtuneError):
    """A target specification that does not fit the model."""


@dataclass(frozen=True)
class Rows:
    """Output rows of a projection that belong to one slice."""

    start: int
    width: int
    stride: int
    count: int = 1

    @classmethod
    def range(cls, start: int, stop: int) -> "Rows":
        return cls(start, stop - start, stop - start, 1)

    @property
    def size(self) -> int:
        return self.width * self.count

    @property
    def contiguous(self) -> bool:
        return self.count == 1 or self.width == self.stride

    @property
    def stop(self) -> int:
        return self.start + (self.count - 1) * self.stride + self.width

    def index(self, device=None) -> torch.Tensor:
        base = torch.arange(self.width, device=device)
        starts = self.start + self.stride * torch.arange(self.count, device=device)
        return (starts[:, None] + base[None, :]).reshape(-1)

    def covers(self, n: int) -> bool:
        return self.contiguous and self.start == 0 and self.size == n

    def take(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The slice's entries of ``x`` along ``dim`` (a view when contiguous)."""
        if self.count == 1 or self.width == self.stride:
            return x.narrow(dim, self.start, self.size)
        return x.index_select(dim, _index(self, x.device))

    def add_(self, y: torch.Tensor, term: torch.Tensor) -> torch.Tensor:
        """y[..., rows] += term, in place along the last dimension; returns y."""
        if self.covers(y.shape[-1]):
            return y.add_(term)
        if self.count == 1 or self.width == self.stride:
            y.narrow(-1, self.start, self.size).add_(term)
            return y
        return y.index_add_(-1, _index(self, y.device), term)

    def copy_(self, x: torch.Tensor, values: torch.Tensor, dim: int = 0) -> None:
        """x[rows] = values along ``dim``, in place."""
        x.index_copy_(dim, _index(self, x.device), values)

    def __str__(self) -> str:
        if self.count == 1:
            return f"{self.start}:{self.start + self.width}"
        return f"{self.start}:{self.stop} ({self.count}×{self.width} every {self.stride})"


@functools.lru_cache(maxsize=None)
def _index(rows: Rows, device: torch.device) -> torch.Tensor:
    return rows.index(device)


@dataclass(frozen=True)
class Target:
    """One slice (``kind``) of one projection module."""

    module: str
    kind: str
    layer: int | None
    rows: Rows
    in_features: int
    out_features: int  # of the whole module, not the slice
    transposed: bool  # GPT-2 Conv1D stores weight as (in, out)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape of ΔW for this slice, (rows, in) in Linear orientation."""
        return (self.rows.size, self.in_features)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rows"] = asdict(self.rows)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Target":
        d = dict(d)
        d["rows"] = Rows(**d["rows"])
        return cls(**d)

    @property
    def name(self) -> str:
        return f"{self.module}[{self.kind}]"

    # The one access path to a slice of a (possibly wrapped, possibly transposed) base weight.
    def projection(self, model: nn.Module) -> nn.Module:
        """The frozen Linear/Conv1D of this target, under any qkvtune wrapper."""
        return unwrapped(model.get_submodule(self.module))

    def rows_of(self, weight_like: torch.Tensor) -> torch.Tensor:
        """This slice's rows (rows × in, Linear orientation) of a tensor shaped like the module's weight
        (the weight itself, its gradient)."""
        return self.rows.take(weight_like.t() if self.transposed else weight_like, 0)

    def weight(self, model: nn.Module) -> torch.Tensor:
        """The slice of the frozen base weight, (rows × in) (dequantized when the base is quantized)."""
        return self.rows.take(weight_rows(self.projection(model)), 0)

    def outputs(self, y: torch.Tensor) -> torch.Tensor:
        """This slice's entries of a projection output (or output gradient), (…, rows)."""
        return self.rows.take(y, -1)


class Wrapped(nn.Module):
    """Base class of modules that wrap a frozen projection as ``.base`` (qkvtune's ``DeltaProjection``)."""

    base: nn.Module


def unwrapped(module: nn.Module) -> nn.Module:
    """The frozen projection under a qkvtune wrapper (targets are found on wrapped models too)."""
    return module.base if isinstance(module, Wrapped) else module


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's Conv1D (weight stored in × out). Any Conv1D instance means its module is loaded, so this
    never imports transformers itself (a cheap import of qkvtune)."""
    utils = sys.modules.get("transformers.pytorch_utils")
    return utils is not None and isinstance(module, utils.Conv1D)


def weight_rows(module: nn.Module) -> torch.Tensor:
    """The base weight of a (possibly wrapped) projection as (out, in): a view (Conv1D stores it transposed),
    or a dequantized copy of a quantized one (``quant.py``)."""
    module = unwrapped(module)
    if is_quantized(module):
        return dequantized(module)
    return module.weight.t() if _is_conv1d(module) else module.weight


@torch.no_grad()
def write_slice(module: nn.Module, rows: Rows, original: torch.Tensor, delta: torch.Tensor | None = None) -> None:
    """The one way ΔW reaches base weights (merge, task vectors, export): W[rows] ← original + ΔW on a
    (possibly wrapped) projection, summed in float64 and cast to the weight's dtype; ``delta=None`` writes
    ``original`` back bit for bit."""
    if is_quantized(unwrapped(module)):
        raise QuantizeError(f"{type(unwrapped(module)).__name__}: a quantized base weight is never written; "
                            "export dequantizes the model first")
    w = weight_rows(module)
    new = original if delta is None else (original.double() + delta.to(original.device).double()).to(w.dtype)
    rows.copy_(w, new, 0)


# --- architecture rules -------------------------------------------------------------------------
# (regex on the module path, anchored at a path component and at the end) -> kind or fused layout.
_SEPARATE = [
    (r"attention\.self\.query", "q"), (r"attention\.self\.key", "k"), (r"attention\.self\.value", "v"),
    (r"attention\.output\.dense", "o"),                                   # BERT, RoBERTa, ELECTRA
    (r"(self_attn|attn|attention)\.q_proj", "q"), (r"(self_attn|attn|attention)\.k_proj", "k"),
    (r"(self_attn|attn|attention)\.v_proj", "v"),
    (r"(self_attn|attn|attention)\.(o_proj|out_proj)", "o"),             # Llama, Mistral, Qwen2, OPT, GPT-J
    (r"attention\.self\.query_proj", "q"), (r"attention\.self\.key_proj", "k"),
    (r"attention\.self\.value_proj", "v"),                             # DeBERTa-v2/v3 (o: attention.output.dense)
    (r"attn\.Wo", "o"),                                                  # ModernBERT (its mlp.Wo is not attention)
    (r"self_attn\.dense", "o"),                                          # Phi-1/2
    (r"self_attention\.dense", "o"),                                     # Falcon, Bloom
    (r"attention\.q_lin", "q"), (r"attention\.k_lin", "k"), (r"attention\.v_lin", "v"),
    (r"attention\.out_lin", "o"),                                         # DistilBERT
    (r"(SelfAttention|EncDecAttention)\.q", "q"), (r"(SelfAttention|EncDecAttention)\.k", "k"),
    (r"(SelfAttention|EncDecAttention)\.v", "v"), (r"(SelfAttention|EncDecAttention)\.o", "o"),  # T5
    (r"attn\.c_proj", "o"),                                               # GPT-2
    (r"attention\.dense", "o"),                                           # GPT-NeoX
]
_FUSED = [
    (r"attn\.c_attn", "c_attn"),                # GPT-2 thirds; GPT-BigCode by its config
    (r"attention\.query_key_value", "per_head"),  # GPT-NeoX, Pythia
    (r"self_attn\.qkv_proj", "gqa_concat"),     # Phi-3
    (r"attn\.Wqkv", "thirds"),                  # ModernBERT, MPT: [q | k | v]
    (r"self_attention\.query_key_value", "by_model"),  # Falcon (three layouts) and Bloom (per head)
]
# MLP projections by role; tried only on modules no attention rule took, and never inside an attention module
# (BERT's attention.output.dense is o, its layer's output.dense is down). "halves": a fused [gate | up].
_MLP = [
    (r"(mlp|ffn|feed_forward)\.gate_proj", "gate"), (r"(mlp|ffn|feed_forward)\.up_proj", "up"),
    (r"(mlp|ffn|feed_forward)\.down_proj", "down"),             # Llama, Mistral, Qwen, Gemma, MPT (ffn)
    (r"mlp\.gate_up_proj", "halves"), (r"mlp\.Wi", "halves"),    # Phi-3; ModernBERT (act(first half) · second)
    (r"mlp\.Wo", "down"),                                        # ModernBERT
    (r"intermediate\.dense", "up"), (r"output\.dense", "down"),  # BERT, RoBERTa, ELECTRA, DeBERTa
    (r"mlp\.c_fc", "up"), (r"mlp\.c_proj", "down"),              # GPT-2 (Conv1D), GPT-BigCode
    (r"mlp\.dense_h_to_4h", "up"), (r"mlp\.dense_4h_to_h", "down"),  # GPT-NeoX, Falcon, Bloom
    (r"(mlp|layers\.\d+)\.fc1", "up"), (r"(mlp|layers\.\d+)\.fc2", "down"),  # Phi-1/2, OPT, BART
    (r"mlp\.fc_in", "up"), (r"mlp\.fc_out", "down"),             # GPT-J
    (r"ffn\.lin1", "up"), (r"ffn\.lin2", "down"),                # DistilBERT
    (r"DenseReluDense\.wi", "up"), (r"DenseReluDense\.wi_0", "gate"), (r"DenseReluDense\.wi_1", "up"),
    (r"DenseReluDense\.wo", "down"),                              # T5 (wi_0, wi_1: gated)
]


def _match(pattern: str, name: str) -> re.Match | None:
    return re.search(r"(^|\.)" + pattern + r"$", name)


def is_projection(module: nn.Module) -> bool:
    module = unwrapped(module)
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def projection_shape(module: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, transposed) of a (possibly wrapped) Linear or GPT-2 Conv1D."""
    module = unwrapped(module)
    if isinstance(module, nn.Linear):  # also quantized ones, whose stored weight is packed
        return module.in_features, module.out_features, False
    w = weight_rows(module)
    return w.shape[1], w.shape[0], _is_conv1d(module)


def layer_index(name: str) -> int | None:
    """The first integer component of a module path: ``model.layers.7.self_attn.q_proj`` -> 7."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def _heads(model: nn.Module) -> tuple[int, int, int | None]:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    n = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv = getattr(cfg, "num_key_value_heads", None) or n
    hd = getattr(cfg, "head_dim", None)
    if n is None:
        raise TargetError("fused projection found but the model config has no num_attention_heads")
    return n, kv, hd


def _text_config(model: nn.Module):
    cfg = getattr(model, "config", None)
    return getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _rows(start: int, width: int, stride: int, count: int) -> Rows:
    """Rows in canonical form: a single block is a plain range."""
    return Rows.range(start, start + width) if count == 1 else Rows(start, width, stride, count)


def _unfit(module: str, why: str) -> TargetError:
    """A fused projection whose rows cannot be read from the config: refuse rather than guess."""
    return TargetError(f"{module}: {why}, so its q/k/v rows are unknown; "
                       f"name the rows with target_modules={{'{module}': {{q: 'a:b', …}}}}")


def _bigcode_rows(out: int, model: nn.Module) -> dict[str, Rows]:
    """GPT-BigCode's ``attn.c_attn`` (a Linear): multi-query splits it (embed, head_dim, head_dim) into
    [q | k | v]; otherwise it is viewed (heads, 3·head_dim), per head as GPT-NeoX."""
    cfg = _text_config(model)
    n = cfg.num_attention_heads
    hd = cfg.hidden_size // n
    if cfg.multi_query:
        if out != (n + 2) * hd:
            raise _unfit("attn.c_attn", f"gpt_bigcode: {out} outputs do not fit multi_query with {n} heads of {hd}")
        return {"q": Rows.range(0, n * hd), "k": Rows.range(n * hd, (n + 1) * hd), "v": Rows.range((n + 1) * hd, out)}
    if out != 3 * n * hd:
        raise _unfit("attn.c_attn", f"gpt_bigcode: {out} outputs are not {n} heads × (q, k, v) of {hd}")
    return {kind: Rows(i * hd, hd, 3 * hd, n) for i, kind in enumerate("qkv")}


def _falcon_rows(out: int, model: nn.Module) -> dict[str, Rows]:
    """Falcon's query_key_value, as modeling_falcon's attention splits it: grouped (new decoder
    architecture: per kv group, its query heads then one key and one value head), per head (q, k, v of each
    head side by side), or multi-query ([all query heads | one key | one value])."""
    cfg = _text_config(model)
    n = cfg.num_attention_heads
    hd = cfg.hidden_size // n
    if getattr(cfg, "new_decoder_architecture", False):
        kv = cfg.num_kv_heads
        if not kv or n % kv or out != (n + 2 * kv) * hd:
            raise _unfit("self_attention.query_key_value",
                         f"falcon: {out} outputs do not fit {kv} groups of {n} heads (+ k, v) of {hd}")
        g = n // kv
        stride = (g + 2) * hd
        return {"q": _rows(0, g * hd, stride, kv), "k": _rows(g * hd, hd, stride, kv),
                "v": _rows((g + 1) * hd, hd, stride, kv)}
    if getattr(cfg, "multi_query", False):
        if out != (n + 2) * hd:
            raise _unfit("self_attention.query_key_value",
                         f"falcon: {out} outputs do not fit multi_query with {n} heads of {hd}")
        return {"q": Rows.range(0, n * hd), "k": Rows.range(n * hd, (n + 1) * hd), "v": Rows.range((n + 1) * hd, (n + 2) * hd)}
    if out != 3 * n * hd:
        raise _unfit("self_attention.query_key_value", f"falcon: {out} outputs are not {n} heads × (q, k, v) of {hd}")
    return {kind: Rows(i * hd, hd, 3 * hd, n) for i, kind in enumerate("qkv")}


def _fused_rows(layout: str, out: int, model: nn.Module) -> dict[str, Rows]:
    if layout == "by_model":
        model_type = _model_type(model)
        if model_type == "falcon":
            return _falcon_rows(out, model)
        if model_type == "bloom":
            layout = "per_head"
        else:
            raise TargetError(f"self_attention.query_key_value of a {model_type!r} model: its q/k/v layout is unknown; "
                              "name the rows with target_modules={'query_key_value': {q: 'a:b', …}}")
    module = "attn.c_attn" if layout == "c_attn" else "attn.Wqkv"
    if layout == "c_attn":
        if _model_type(model) == "gpt_bigcode":
            return _bigcode_rows(out, model)
        layout = "thirds"
    if layout == "thirds":
        hidden = getattr(_text_config(model), "hidden_size", None)
        if out % 3 or (hidden and out != 3 * hidden):  # e.g. a grouped-query MPT from remote code
            raise _unfit(module, f"{_model_type(model)}: {out} outputs are not three blocks of hidden_size {hidden}")
        d = out // 3
        return {"q": Rows.range(0, d), "k": Rows.range(d, 2 * d), "v": Rows.range(2 * d, 3 * d)}
    n, kv, hd = _heads(model)
    if layout == "per_head":
        hd = out // (3 * n)
        return {kind: Rows(i * hd, hd, 3 * hd, n) for i, kind in enumerate("qkv")}
    # gqa_concat
    hd = hd or out // (n + 2 * kv)
    q, k = n * hd, kv * hd
    return {"q": Rows.range(0, q), "k": Rows.range(q, q + k), "v": Rows.range(q + k, q + 2 * k)}


def _halves(name: str, out: int, model: nn.Module) -> dict[str, Rows]:
    """A fused gated-MLP input projection laid out [gate | up], each intermediate_size wide."""
    inter = getattr(_text_config(model), "intermediate_size", None)
    if out % 2 or (inter and out != 2 * inter):
        raise TargetError(f"{name}: {out} outputs are not two halves of intermediate_size {inter}, so its gate/up rows "
                          f"are unknown; name the rows with target_modules={{'{name}': {{gate: 'a:b', up: 'c:d'}}}}")
    return {"gate": Rows.range(0, out // 2), "up": Rows.range(out // 2, out)}


def _in_attention(name: str) -> bool:
    lower = name.lower()
    return "attention" in lower or "attn" in lower


def _slices(name: str, module: nn.Module, model: nn.Module) -> list[Target]:
    """The recognised slices of one projection: attention rules first, then (outside attention) MLP rules."""
    fin, fout, transposed = projection_shape(module)
    layer = layer_index(name)

    def whole(kind: str) -> list[Target]:
        return [Target(name, kind, layer, Rows.range(0, fout), fin, fout, transposed)]

    def parts(rows: dict[str, Rows]) -> list[Target]:
        return [Target(name, kind, layer, r, fin, fout, transposed) for kind, r in rows.items()]

    for pattern, kind in _SEPARATE:
        if _match(pattern, name):
            return whole(kind)
    for pattern, layout in _FUSED:
        if _match(pattern, name):
            return parts(_fused_rows(layout, fout, model))
    if not _in_attention(name):
        for pattern, kind in _MLP:
            if _match(pattern, name):
                return parts(_halves(name, fout, model)) if kind == "halves" else whole(kind)
    return []


def projections(model: nn.Module) -> list[Target]:
    """Every recognised slice in the model — attention q, k, v, o and MLP gate, up, down — in model order."""
    return [t for name, module in model.named_modules() if is_projection(module) for t in _slices(name, module, model)]


def all_projections(model: nn.Module) -> list[Target]:
    """Every recognised attention slice in the model (all kinds, all layers)."""
    return [t for t in projections(model) if t.kind in ATTENTION_KINDS]


def mlp_projections(model: nn.Module) -> list[Target]:
    """Every recognised MLP slice in the model (gate, up, down; all layers)."""
    return [t for t in projections(model) if t.kind in MLP_KINDS]


def _own(name: str, module: nn.Module) -> Target:
    """An unrecognised projection as one target named after its last path component (PEFT's module names)."""
    fin, fout, transposed = projection_shape(module)
    return Target(name, name.rsplit(".", 1)[-1], layer_index(name), Rows.range(0, fout), fin, fout, transposed)


def all_linear(model: nn.Module, heads=None) -> list[Target]:
    """PEFT's ``target_modules="all-linear"``: every Linear/Conv1D except the output layer (the LM head) and the
    task heads, which train whole — each recognised projection as its slices, any other (BERT's pooler) whole
    under its own name. ``heads``: the task heads' module paths (default: the usual head names at the top)."""
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if heads is None:
        heads = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    inner = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, Wrapped)}  # the wrapper stands for it
    found = []
    for name, module in model.named_modules():
        if not is_projection(module) or name in inner or (out_layer is not None and unwrapped(module) is out_layer) \
                or any(name == h or name.startswith(h + ".") for h in heads):
            continue
        found += _slices(name, module, model) or [_own(name, module)]
    return found


def _summary(model: nn.Module) -> str:
    names = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, m in model.named_modules() if is_projection(m)})
    return ", ".join(names[:12]) + (" …" if len(names) > 12 else "")


def parse_layers(spec, num_layers: int) -> set[int]:
    """``None``/"all" -> every layer; ``[0, -1]`` -> those; "last:N" / "first:N"; a slice string "a:b"."""
    if spec is None or spec == "all":
        return set(range(num_layers))
    if isinstance(spec, int):
        spec = [spec]
    if isinstance(spec, (list, tuple)):
        out = set()
        for i in spec:
            if not isinstance(i, int) or not -num_layers <= i < num_layers:
                raise TargetError(f"layers: {i!r} is not a layer index of a model with {num_layers} layers")
            out.add(i % num_layers)
        return out
    if isinstance(spec, str):
        m = re.fullmatch(r"(last|first):(\d+)", spec.strip())
        if m:
            n = int(m.group(2))
            if not 0 < n <= num_layers:
                raise TargetError(f"layers: {spec!r} asks for {n} of {num_layers} layers")
            return set(range(num_layers - n, num_layers)) if m.group(1) == "last" else set(range(n))
        m = re.fullmatch(r"(-?\d*):(-?\d*)", spec.strip())
        if m:
            a = int(m.group(1)) if m.group(1) else None
            b = int(m.group(2)) if m.group(2) else None
            return set(range(num_layers)[a:b])
    raise TargetError(f"layers: cannot read {spec!r} (use all, a list of indices, 'last:N' or 'a:b')")


def _parse_rows(spec, fout: int, where: str) -> Rows:
    if spec in (None, "all"):
        return Rows.range(0, fout)
    m = re.fullmatch(r"(\d+):(\d+)", str(spec).strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)) <= fout:
        raise TargetError(f"target_modules: {where}: rows {spec!r} are not a range 'a:b' within 0:{fout}")
    return Rows.range(int(m.group(1)), int(m.group(2)))


def _explicit(model: nn.Module, spec: dict) -> list[Target]:
    """``{"attn.c_attn": {"q": "0:768", "v": "1536:2304"}, "attn.c_proj": "o"}`` (keys are path suffixes)."""
    found = []
    for key, kinds in spec.items():
        hits = [(n, m) for n, m in model.named_modules() if (n == key or n.endswith("." + key)) and is_projection(m)]
        if not hits:
            raise TargetError(f"target_modules: no Linear/Conv1D module ends with {key!r}; found {_summary(model)}")
        if isinstance(kinds, str):
            kinds = {kinds: "all"}
        if not isinstance(kinds, dict):
            raise TargetError(f"target_modules: {key!r} must map to a kind or to {{kind: 'a:b'}}")
        for name, module in hits:
            fin, fout, transposed = projection_shape(module)
            for kind, rows in kinds.items():
                found.append(Target(name, str(kind), layer_index(name), _parse_rows(rows, fout, key), fin, fout, transposed))
    return found


def _named(model: nn.Module, names: list[str]) -> list[Target]:
    """PEFT's ``target_modules`` list: every slice of the modules ending with one of ``names`` — a recognised
    projection's slices (all of a fused one), else the whole module under its own name."""
    recognised: dict[str, list[Target]] = {}
    for t in projections(model):
        recognised.setdefault(t.module, []).append(t)
    found = []
    for key in names:
        hits = [(n, m) for n, m in model.named_modules() if (n == key or n.endswith("." + key)) and is_projection(m)]
        if not hits:
            raise TargetError(f"target_modules: no Linear/Conv1D module ends with {key!r}; found {_summary(model)}")
        for name, module in hits:
            found += recognised.get(name) or [_own(name, module)]
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return sorted({(t.module, t.kind): t for t in found}.values(), key=lambda t: order[t.module])  # model order


def expand_kinds(kinds, have) -> list[str]:
    """Groups (``mlp``) replaced by those of their kinds the model has (``all-linear``: every kind in ``have``); a
    group with none stays, to be refused."""
    if ALL_LINEAR in kinds:
        return list(dict.fromkeys(have))
    out = []
    for k in kinds:
        members = [m for m in GROUPS.get(k, ()) if m in have] or [k]
        out += [m for m in members if m not in out]
    return out


def find_targets(model: nn.Module, kinds=("q", "v"), layers=None, target_modules: dict | list | None = None,
                 heads=None) -> list[Target]:
    """The slices to tune: ``kinds`` (q, k, v, o, gate, up, down; ``mlp`` for the MLP's; ``all-linear`` alone for
    every linear layer but the output layer and the task ``heads``) of the recognised projections (or of
    ``target_modules``: PEFT's list of module names or an explicit mapping), restricted to ``layers``;
    ``kinds=None`` keeps every slice of ``target_modules``. Raises TargetError naming what was found when
    nothing fits."""
    kinds = [kinds] if isinstance(kinds, str) else (None if kinds is None else list(kinds))
    if kinds is not None and ALL_LINEAR in kinds:
        if len(kinds) > 1 or target_modules:
            raise TargetError(f"targets: {ALL_LINEAR} names every linear layer itself; give it alone, without "
                              "target_modules")
        found, kinds = all_linear(model, heads), None
    elif kinds is None:
        if not isinstance(target_modules, list):
            raise TargetError("targets: needed unless target_modules lists module names")
        found = _named(model, target_modules)
    elif isinstance(target_modules, list):
        found = _named(model, target_modules)
    elif target_modules:
        found = _explicit(model, target_modules)
    else:
        found = projections(model)
        if not found:
            raise TargetError(
                f"no attention or MLP projections recognised in {type(model).__name__}; projections found: "
                f"{_summary(model)}. Pass target_modules={{module_suffix: kind}} to name them.")
    have = sorted({t.kind for t in found})
    if kinds is not None:
        kinds = expand_kinds(kinds, have)
        missing = [k for k in kinds if k not in have]
        if missing:
            raise TargetError(f"targets: {missing} not found in {type(model).__name__}; it has {have}")
        found = [t for t in found if t.kind in kinds]
    layer_ids = sorted({t.layer for t in found if t.layer is not None})
    if layers not in (None, "all") and layer_ids:
        keep = {layer_ids[i] for i in parse_layers(layers, len(layer_ids))}
        found = [t for t in found if t.layer in keep]
    if not found:
        raise TargetError(f"targets: nothing left after restricting to layers={layers!r}")
    return found
