"""Task vectors on ΔW: τ = the merged update of a fine-tuned adapter of any method, per attention slice.

Arithmetic (+, −, scalar ·, dot, cos) happens on ΔW itself, never on LoRA's A and B separately (scaling A
and B both would scale ΔW twice; PEFT #3004). ``apply(model, τ, λ)`` writes θ₀ + Σ λ_t τ_t into the
base weights; ``choose_coefficient`` picks λ on validation data with a caller's eval function.

Exactness: floating-point (w + d) − d is not always w. So the model keeps a ledger: the original rows of
every slice it touched and the list of applied terms (τ, λ). Each apply recomputes the touched rows as
original + Σ λτ (in float64, then cast), and a term that is the exact negation of an earlier one
(λ'τ' = −λτ bit for bit, e.g. ``apply(m, -τ)`` after ``apply(m, τ)``) removes it; with no term left on a
slice the original bits are written back. ``restore`` returns to the originals at any time.
"""

from __future__ import annotations

import torch

from . import AnalysisError
from ..attach import delete_adapter, iter_deltas
from ..targets import Rows, weight_rows, write_slice

Key = tuple[str, str, Rows]  # (module path, kind, rows)
_LEDGER = "qkvtune_task_arithmetic"


def key_name(key: Key) -> str:
    return f"{key[0]}[{key[1]}]"


class TaskVector:
    """ΔW per slice, float64. Missing slices count as zero in every operation."""

    def __init__(self, deltas: dict[Key, torch.Tensor]):
        self.deltas = {k: v.detach().double() for k, v in deltas.items()}

    @classmethod
    def from_model(cls, model, name: str | None = None) -> "TaskVector":
        """The task vector of adapter ``name`` (default: the active one) attached to ``model``."""
        pairs = list(iter_deltas(model, name))
        if not pairs:
            raise AnalysisError(f"adapter: the model has no adapter named {name!r}")
        with torch.no_grad():
            return cls({(d.target.module, d.kind, d.target.rows): d.delta_weight(d.target.weight(model)).clone()
                        for _, d in pairs})

    @classmethod
    def from_adapter(cls, model, path: str, name: str = "_task_vector") -> "TaskVector":
        """Load the adapter folder ``path`` onto ``model`` (its base), take its ΔW, and remove it again."""
        from ..io import load_adapter

        load_adapter(model, path, name, activate=False)
        try:
            return cls.from_model(model, name)
        finally:
            delete_adapter(model, name)

    # arithmetic ---------------------------------------------------------------------------------------
    def _combine(self, other: "TaskVector", sign: float) -> "TaskVector":
        out = dict(self.deltas)
        for k, v in other.deltas.items():
            out[k] = out[k] + sign * v if k in out else sign * v
        return TaskVector(out)

    def __add__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum([...]) starts from 0
            return self
        if not isinstance(other, TaskVector):
            return NotImplemented
        return self._combine(other, 1.0)

    __radd__ = __add__

    def __sub__(self, other):
        return self._combine(other, -1.0)

    def __neg__(self):
        return TaskVector({k: -v for k, v in self.deltas.items()})

    def __mul__(self, c: float):
        if not isinstance(c, (int, float)):
            return NotImplemented
        return TaskVector({k: c * v for k, v in self.deltas.items()})

    __rmul__ = __mul__

    def dot(self, other: "TaskVector", kind: str | None = None) -> float:
        return float(sum((v * other.deltas[k]).sum() for k, v in self.deltas.items()
                         if k in other.deltas and (kind is None or k[1] == kind)))

    def norm(self, kind: str | None = None) -> float:
        return self.dot(self, kind) ** 0.5

    def cos(self, other: "TaskVector", kind: str | None = None) -> float:
        den = self.norm(kind) * other.norm(kind)
        return self.dot(other, kind) / den if den > 0 else 0.0

    def kinds(self) -> list[str]:
        return sorted({k[1] for k in self.deltas})

    def __repr__(self):
        return f"TaskVector({len(self.deltas)} slices, kinds={self.kinds()}, norm={self.norm():.4g})"


def combine(vectors: list[TaskVector], coefs: list[float] | None = None) -> TaskVector:
    """Σ λ_t τ_t (λ_t = 1 by default)."""
    coefs = coefs or [1.0] * len(vectors)
    if len(coefs) != len(vectors) or not vectors:
        raise AnalysisError(f"coefs: {len(coefs)} coefficients for {len(vectors)} task vectors")
    return sum(c * v for c, v in zip(coefs, vectors))


# --- writing θ₀ + Σλτ into a model ------------------------------------------------------------------------

def _ledger(model) -> dict:
    if not hasattr(model, _LEDGER):
        object.__setattr__(model, _LEDGER, {"originals": {}, "terms": []})
    return getattr(model, _LEDGER)


def _cancels(tv: TaskVector, coef: float, other: TaskVector, other_coef: float) -> bool:
    if tv.deltas.keys() != other.deltas.keys():
        return False
    return all(torch.equal(coef * v, -(other_coef * other.deltas[k])) for k, v in tv.deltas.items())


@torch.no_grad()
def apply(model, tv: TaskVector, coef: float = 1.0) -> None:
    """Add λτ to the model's base weights (θ ← θ₀ + Σ applied λτ); exact undo by applying the negation."""
    ledger = _ledger(model)
    for key in tv.deltas:
        w = weight_rows(model.get_submodule(key[0]))
        if tuple(tv.deltas[key].shape) != (key[2].size, w.shape[1]):
            raise AnalysisError(f"task vector: {key_name(key)} has shape {tuple(tv.deltas[key].shape)}, "
                                f"the model's slice is {(key[2].size, w.shape[1])}")
        if key not in ledger["originals"]:
            ledger["originals"][key] = key[2].take(w, 0).clone()
    terms = ledger["terms"]
    for i, (other, c) in enumerate(terms):
        if _cancels(tv, coef, other, c):
            del terms[i]
            break
    else:
        terms.append((tv, float(coef)))
    _rewrite(model, tv.deltas.keys())


def _rewrite(model, keys) -> None:
    ledger = _ledger(model)
    for key in keys:
        parts = [c * tv.deltas[key] for tv, c in ledger["terms"] if key in tv.deltas]
        write_slice(model.get_submodule(key[0]), key[2], ledger["originals"][key], sum(parts) if parts else None)


@torch.no_grad()
def restore(model) -> None:
    """Write back the original rows of every slice a task vector touched; forget all applied terms."""
    ledger = _ledger(model)
    ledger["terms"].clear()
    _rewrite(model, list(ledger["originals"]))
    ledger["originals"].clear()


def choose_coefficient(model, tv: TaskVector, evaluate, coefs=None, greater_is_better: bool = True) -> dict:
    """Score θ₀ + λτ for each λ with ``evaluate(model) -> float`` (validation data), leave the model as it
    was (exactly), and return {"coef": best λ, "score": its score, "scores": {λ: score}}."""
    coefs = list(coefs) if coefs is not None else [round(0.1 * i, 2) for i in range(16)]
    scores = {}
    for c in coefs:
        apply(model, tv, c)
        try:
            scores[c] = float(evaluate(model))
        finally:
            apply(model, tv, -c)  # exact negation of the term just applied: removed from the ledger
    pick = max if greater_is_better else min
    best = pick(scores, key=scores.get)
    return {"coef": best, "score": scores[best], "scores": scores}


# --- similarity -------------------------------------------------------------------------------------------

def kernel_alignment(k1: torch.Tensor, k2: torch.Tensor, centered: bool = False) -> float:
    """⟨K₁, K₂⟩_F / (‖K₁‖_F‖K₂‖_F) on the same examples; ``centered`` uses HKH, H = I − 11ᵀ/n."""
    k1, k2 = k1.double(), k2.double()
    if k1.shape != k2.shape:
        raise AnalysisError(f"kernels: shapes {tuple(k1.shape)} and {tuple(k2.shape)} differ (use the same examples)")
    if centered:
        h = torch.eye(len(k1), dtype=torch.float64) - 1.0 / len(k1)
        k1, k2 = h @ k1 @ h, h @ k2 @ h
    den = float(k1.norm() * k2.norm())
    return float((k1 * k2).sum()) / den if den > 0 else 0.0


def similarity_report(vectors: dict[str, TaskVector], kernels: dict[str, torch.Tensor] | None = None) -> dict:
    """Pairwise cos(τ_s, τ_t) (all slices and per kind), norms, and — given each task's kernel on a shared
    set of examples — pairwise kernel alignment (plain and centered)."""
    names = list(vectors)
    kinds = sorted({k for v in vectors.values() for k in v.kinds()})
    grid = lambda f: [[f(a, b) for b in names] for a in names]  # noqa: E731
    out = {"names": names, "norms": {n: vectors[n].norm() for n in names},
           "cosine": grid(lambda a, b: vectors[a].cos(vectors[b])),
           "cosine_per_kind": {k: grid(lambda a, b: vectors[a].cos(vectors[b], k)) for k in kinds}}
    if kernels:
        out["kernel_alignment"] = grid(lambda a, b: kernel_alignment(kernels[a], kernels[b]))
        out["kernel_alignment_centered"] = grid(lambda a, b: kernel_alignment(kernels[a], kernels[b], True))
    return out
