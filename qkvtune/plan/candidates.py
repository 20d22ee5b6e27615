"""What ``qkvtune plan`` compares: candidates (target kinds × λ, with η_V = λ·η_Q), the default sets,
and the command line's ways of naming them."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, TrainConfig
from ..optim import lr_for_kind
from ..targets import ALL_LINEAR, ATTENTION_KINDS, GROUPS, MATRIX_KINDS, MLP_KINDS, expand_kinds

KIND_SETS = (("v",), ("q", "v"), ("q", "k", "v"), ("q", "k", "v", "o"), ("mlp",), (ALL_LINEAR,))
LAMBDAS = (1.0, 2.0, 4.0, 8.0)


@dataclass(frozen=True)
class Candidate:
    """A setting of the matrices a run tunes: ``targets`` as a config names them (kinds, ``mlp``, ``all-linear``)
    and λ (η_V = λ·η_Q). The learning rate is the third axis of the plan's grid, kept apart."""

    targets: tuple[str, ...]
    lr_ratio: float

    @property
    def name(self) -> str:
        return f"{','.join(self.targets)} λ={self.lr_ratio:g}"

    def kinds(self, have=MATRIX_KINDS) -> list[str]:
        """The matrix kinds it tunes on a model whose kinds are ``have`` (``mlp``, ``all-linear`` expanded)."""
        return expand_kinds(self.targets, have)

    def rates(self, have=MATRIX_KINDS, lr: float = 1.0, lr_mlp_ratio: float = 1.0) -> dict[str, float]:
        """Each tuned kind's rate at η_Q = ``lr``, by the optimizer's own rule (``optim.lr_for_kind``)."""
        unit = TrainConfig(lr=lr, lr_ratio=self.lr_ratio, lr_mlp_ratio=lr_mlp_ratio)
        return {k: lr_for_kind(unit, k) for k in self.kinds(have)}

    def settings(self) -> dict:
        """The config keys that make a run of this candidate (its rate aside)."""
        return {"targets": list(self.targets), "lr_ratio": self.lr_ratio}

    @property
    def group(self) -> str:
        """attention only, MLP only, all-linear (or mixed): the question practitioners ask of the targets."""
        if ALL_LINEAR in self.targets:
            return "all-linear"
        kinds = self.kinds()
        if all(k in ATTENTION_KINDS for k in kinds):
            return "attention only"
        return "MLP only" if all(k in MLP_KINDS for k in kinds) else "mixed"


def tunes_v_with_another(targets) -> bool:
    """λ matters where v is tuned beside another kind (alone, η_V just rescales time; without v it does nothing)."""
    return ALL_LINEAR in targets or ("v" in targets and len(targets) > 1)


def candidates(kind_sets=KIND_SETS, lambdas=LAMBDAS) -> list[Candidate]:
    """targets × λ; λ only where v is tuned with another kind."""
    out = []
    for kinds in kind_sets:
        for lam in lambdas if tunes_v_with_another(kinds) else (1.0,):
            out.append(Candidate(tuple(kinds), float(lam)))
    return out


def parse_candidates(kinds: str | None, lambdas: str | None) -> list[Candidate]:
    """``--kinds "v;q,v;mlp;all-linear"`` and ``--lambdas 1,2,4`` (defaults: ``KIND_SETS``, λ ∈ {1, 2, 4, 8})."""
    sets = KIND_SETS
    if kinds:
        sets = tuple(tuple(k.strip() for k in group.split(",") if k.strip()) for group in kinds.split(";"))
        known = set(MATRIX_KINDS) | set(GROUPS)
        bad = [k for group in sets for k in group if k not in known and k != ALL_LINEAR]
        if bad or not all(sets) or any(ALL_LINEAR in g and len(g) > 1 for g in sets):
            raise ConfigError(f"--kinds: expected groups of {', '.join(MATRIX_KINDS)}, mlp, or all-linear alone, separated "
                              f"by ';', got {kinds!r}")
    try:
        lams = tuple(float(x) for x in lambdas.split(",")) if lambdas else LAMBDAS
    except ValueError:
        raise ConfigError(f"--lambdas: expected comma-separated numbers, got {lambdas!r}") from None
    if any(not lam > 0 for lam in lams):
        raise ConfigError(f"--lambdas: every λ must be > 0, got {lambdas!r}")
    return candidates(sets, lams)


def parse_numbers(text: str | None, what: str) -> list[float] | None:
    if not text:
        return None
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ConfigError(f"{what}: expected positive numbers, got {text!r}")
    return values


REFERENCE = Candidate(("q", "v"), 1.0)  # the calibration run's candidate (and bench plan's reference arm)
