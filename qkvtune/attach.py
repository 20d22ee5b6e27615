"""Put deltas on a model: one wrapper per projection, several slices (and named adapters) per wrapper.

``DeltaProjection`` replaces a Linear/Conv1D and adds, for each active adapter, each delta's term to the
rows of its slice. ``TrainableHead`` keeps one copy of the task head per adapter, so adapters switch
together with their heads. Everything else in the model stays frozen. The functions below are the
whole model-level API: add, activate, merge/unmerge, delete, unwrap, and list deltas.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from .deltas import Delta, build_delta
from .quant import standard_layout
from .targets import HEAD_NAMES, Rows, Target, Wrapped, weight_rows, write_slice
from .task import is_causal_lm


class DeltaProjection(Wrapped):
    """A frozen projection plus the deltas of one or more adapters on its slices."""

    def __init__(self, base: nn.Module, transposed: bool):
        super().__init__()
        self.base = base
        self.transposed = transposed
        self.adapters = nn.ModuleDict()  # adapter name -> ModuleDict(kind -> Delta)
        self.active: list[str] = []
        self.merged: dict[str, dict[str, torch.Tensor]] = {}  # adapter -> kind -> original rows

    # HF code sometimes reads .weight/.bias of a projection (dtype checks); keep that working.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def weight_rows(self) -> torch.Tensor:
        """The base weight as (out, in), a view (Conv1D stores it transposed)."""
        return weight_rows(self.base)

    def slice_weight(self, rows: Rows) -> torch.Tensor:
        return rows.take(self.weight_rows(), 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        terms = []
        for name in self.active:
            if name in self.merged:
                continue
            for delta in self.adapters[name].values():
                rows = delta.target.rows
                if delta.needs_base_out:
                    base_out = rows.take(y)
                    if self.base.bias is not None:
                        base_out = base_out - rows.take(self.base.bias)
                    elif base_out._base is y or base_out is y:  # a view of y, which the adds below change in place
                        base_out = base_out.clone()
                    terms.append((rows, delta(x, base_out, self.slice_weight(rows))))
                else:
                    terms.append((rows, delta(x)))
        for rows, term in terms:  # all terms see the untouched base output first
            # in place on the projection's fresh output: autograd of the matmul does not need it
            y = rows.add_(y, term.to(y.dtype))
        return y

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """W ← W + ΔW on each slice; the original rows are kept so unmerge is exact."""
        if name in self.merged:
            return
        saved = {}
        for kind, delta in self.adapters[name].items():
            original = self.slice_weight(delta.target.rows).clone()
            saved[kind] = original
            write_slice(self, delta.target.rows, original, delta.delta_weight(original))
        self.merged[name] = saved

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        if name not in self.merged:
            return
        later = list(self.merged)[list(self.merged).index(name) + 1:]
        for other in reversed(later):  # restore in reverse order of merging, then merge the later ones again
            self._restore(other)
        self._restore(name)
        for other in later:
            self.merge(other)

    def _restore(self, name: str) -> None:
        for kind, original in self.merged.pop(name).items():
            write_slice(self, self.adapters[name][kind].target.rows, original)

    def extra_repr(self) -> str:
        return f"active={self.active}, merged={list(self.merged)}"


class TrainableHead(nn.Module):
    """One copy of a task head per adapter (the original stays frozen underneath)."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active: str | None = None

    def add(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original)

    def current(self) -> nn.Module:
        return self.copies[self.active] if self.active in self.copies else self.original

    def forward(self, *args, **kwargs):
        return self.current()(*args, **kwargs)


@dataclass
class AdapterInfo:
    """What an adapter is: method, hyperparameters, the slices it touches and its head modules."""

    method: str
    hparams: dict
    targets: list[Target]
    heads: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"method": self.method, "hparams": self.hparams, "heads": self.heads,
                "targets": [t.to_dict() for t in self.targets]}


# --- model-level API -------------------------------------------------------------------------------

def _registry(model: nn.Module) -> dict[str, AdapterInfo]:
    if not hasattr(model, "qkvtune_adapters"):
        model.qkvtune_adapters = {}
    return model.qkvtune_adapters


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _wrapper(model: nn.Module, target: Target) -> DeltaProjection:
    module = model.get_submodule(target.module)
    if not isinstance(module, DeltaProjection):
        module = DeltaProjection(standard_layout(module), target.transposed)
        _set_submodule(model, target.module, module)
    return module


def find_heads(model: nn.Module, new_modules: list[str] | tuple = ()) -> list[str]:
    """Task-head modules: the usual head names at the top level, plus modules created fresh at load."""
    if is_causal_lm(model):
        return []
    heads = [n for n, _ in model.named_children() if n in HEAD_NAMES]
    for n in new_modules:
        if n and n not in heads and not any(n.startswith(h + ".") for h in heads):
            heads.append(n)
    return heads


def add_adapter(model: nn.Module, targets: list[Target], method: str = "lora", name: str = "default", *,
                heads: list[str] | None = None, activate: bool = True, **hparams) -> list[Delta]:
    """Attach one delta per target under adapter ``name``; heads default to ``find_heads(model)``.

    ``hparams`` go to the method (rank, alpha, rslora, dropout). The new adapter becomes the active,
    trainable one unless ``activate`` is False.
    """
    registry = _registry(model)
    if name in registry:
        raise ValueError(f"adapter {name!r} already exists")
    seen = set()
    for t in targets:
        if (t.module, t.kind) in seen:
            raise ValueError(f"targets: {t.module}[{t.kind}] given twice")
        seen.add((t.module, t.kind))
    deltas = []
    for t in targets:
        wrapper = _wrapper(model, t)
        if name not in wrapper.adapters:
            wrapper.adapters[name] = nn.ModuleDict()
        delta = build_delta(method, t, wrapper.slice_weight(t.rows), **hparams)
        wrapper.adapters[name][t.kind] = delta
        deltas.append(delta)
    heads = find_heads(model) if heads is None else list(heads)
    for h in heads:
        module = model.get_submodule(h)
        if not isinstance(module, TrainableHead):
            module = TrainableHead(module)
            _set_submodule(model, h, module)
        module.add(name)
    registry[name] = AdapterInfo(method, _hyperparameters(deltas), list(targets), heads)
    if activate:
        set_adapter(model, name)
    return deltas


def _hyperparameters(deltas: list[Delta]) -> dict:
    """The adapter's hyperparameters as its deltas declare them: settings they share, per-slice lists
    (SMT's blocks) joined."""
    out: dict = {}
    for d in deltas:
        for k, v in d.hyperparameters().items():
            if isinstance(v, list):
                out.setdefault(k, []).extend(v)
            else:
                out.setdefault(k, v)
    return out


def adapter_info(model: nn.Module, name: str | None = None) -> AdapterInfo:
    """What adapter ``name`` (default: the first active one) is: method, hyperparameters, slices, heads."""
    return _registry(model)[resolve_name(model, name)]


def adapter_names(model: nn.Module) -> list[str]:
    return list(_registry(model))


def active_adapters(model: nn.Module) -> list[str]:
    for m in model.modules():
        if isinstance(m, DeltaProjection):
            return list(m.active)
    return []


def set_adapter(model: nn.Module, names: str | list[str], trainable: bool = True) -> None:
    """Activate ``names`` (the first one's head is used); make exactly their deltas and head trainable."""
    names = [names] if isinstance(names, str) else list(names)
    for n in names:
        if n not in _registry(model):
            raise KeyError(f"no adapter named {n!r}; have {adapter_names(model)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, DeltaProjection):
            m.active = [n for n in names if n in m.adapters]
            for n in m.active:
                m.adapters[n].requires_grad_(trainable)
        elif isinstance(m, TrainableHead):
            m.active = next((n for n in names if n in m.copies), None)
            if m.active is not None:
                m.copies[m.active].requires_grad_(trainable)


@contextlib.contextmanager
def heads_only(model: nn.Module, name: str):
    """Adapter ``name``'s task head on and every delta off: the model is its base weights (plus whatever task
    vectors were written into them) with that head. The adapters' activation is restored on exit."""
    set_adapter(model, name)
    wrappers = [m for m in model.modules() if isinstance(m, DeltaProjection)]
    saved = [list(m.active) for m in wrappers]
    for m in wrappers:
        m.active = []
    try:
        yield model
    finally:
        for m, a in zip(wrappers, saved):
            m.active = a


def iter_deltas(model: nn.Module, name: str | None = None):
    """(wrapper, delta) for every delta of adapter ``name`` (default: the first active one)."""
    name = name or (active_adapters(model) or [None])[0]
    for m in model.modules():
        if isinstance(m, DeltaProjection) and name in m.adapters:
            for delta in m.adapters[name].values():
                yield m, delta


def head_modules(model: nn.Module, name: str | None = None) -> dict[str, nn.Module]:
    """Module path -> the head copy that belongs to adapter ``name``."""
    name = name or (active_adapters(model) or [None])[0]
    return {n: m.copies[name] for n, m in model.named_modules() if isinstance(m, TrainableHead) and name in m.copies}


def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Fold ΔW into the base weights: inference then costs exactly the base model's matmuls."""
    for wrapper, _ in _wrappers_of(model, name):
        wrapper.merge(resolve_name(model, name))


def unmerge_adapter(model: nn.Module, name: str | None = None) -> None:
    for wrapper, _ in _wrappers_of(model, name):
        wrapper.unmerge(resolve_name(model, name))


def resolve_name(model: nn.Module, name: str | None) -> str:
    """``name``, or the first active adapter's; KeyError when there is no such adapter."""
    name = name or (active_adapters(model) or [None])[0]
    if name not in _registry(model):
        raise KeyError(f"no adapter named {name!r}; have {adapter_names(model)}")
    return name


def _wrappers_of(model, name):
    name = resolve_name(model, name)
    return [(m, name) for m in model.modules() if isinstance(m, DeltaProjection) and name in m.adapters]


def delete_adapter(model: nn.Module, name: str) -> None:
    for wrapper, _ in _wrappers_of(model, name):
        wrapper.unmerge(name)
        del wrapper.adapters[name]
        wrapper.active = [n for n in wrapper.active if n != name]
    for m in model.modules():
        if isinstance(m, TrainableHead) and name in m.copies:
            del m.copies[name]
            m.active = None if m.active == name else m.active
    del _registry(model)[name]


def unwrap(model: nn.Module, merge: bool = True) -> nn.Module:
    """Return the plain model: active adapters merged into the weights (when ``merge``), wrappers removed,
    each head replaced by the active adapter's copy. The result saves as an ordinary HF model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, DeltaProjection):
            if merge:
                for n in m.active:
                    m.merge(n)
            m.merged.clear()  # the merge is now permanent
            _set_submodule(model, name, m.base)
        elif isinstance(m, TrainableHead):
            _set_submodule(model, name, m.current() if merge else m.original)
    if hasattr(model, "qkvtune_adapters"):
        del model.qkvtune_adapters
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts of the model as it stands (adapters and head copies included)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
