"""The claims suite's files: ``suite.yaml`` (seeds, shared and family settings, learning-rate grids, the gate,
budgets, profiles) and one ``c*.yaml`` per claim, read and checked; task slots (``glue.0``, ``commonsense.1``)
resolved against the tasks a data folder holds. The format is described in ``claims.py``."""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from ..config import ConfigError, read_yaml
from .measures import MEASURES, TRAINING_MEASURES

FAMILIES = ("glue", "commonsense")
CLAIM_KEYS = {"id", "title", "source", "paper", "tasks", "base", "arms", "measures", "checks", "derived", "notes",
              "reference"}
SUITE_KEYS = {"seeds", "base", "families", "prefer", "lr_grid", "gate", "not_learned", "profiles", "budgets"}


def default_suite_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "configs", "claims")


@dataclass
class Claim:
    id: str
    title: str
    tasks: list[str]
    arms: dict[str, dict]
    source: str = ""
    paper: str = ""
    base: dict = field(default_factory=dict)
    measures: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    derived: list[dict] = field(default_factory=list)
    notes: str = ""
    reference: str | None = None
    path: str = ""

    @property
    def ref(self) -> str:
        return self.reference or next(iter(self.arms))


def load_settings(folder: str) -> dict:
    """suite.yaml of ``folder`` alone (seeds, shared and family settings, lr grid, gate), keys checked."""
    path = os.path.join(folder, "suite.yaml")
    if not os.path.exists(path):
        raise ConfigError(f"--suite: {path} not found")
    suite = read_yaml(path)
    for key in suite:
        if key not in SUITE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r} (expected {sorted(SUITE_KEYS)})")
    return suite


def load_suite(folder: str) -> tuple[dict, list[Claim]]:
    """suite.yaml and every c*.yaml of ``folder``, checked: unknown keys, arms, slots, check operands."""
    suite = load_settings(folder)
    claims = []
    for cpath in sorted(glob.glob(os.path.join(folder, "c*.yaml"))):
        data = read_yaml(cpath)
        bad = set(data) - CLAIM_KEYS
        if bad:
            raise ConfigError(f"{cpath}: unknown key {sorted(bad)[0]!r}")
        for key in ("id", "title", "tasks", "arms"):
            if key not in data:
                raise ConfigError(f"{cpath}: missing key {key!r}")
        claim = Claim(**{k: v for k, v in data.items()}, path=cpath)
        claim.base = claim.base or {}
        for slot in claim.tasks:
            family, _, index = str(slot).partition(".")
            if family not in FAMILIES or not index.isdigit():
                raise ConfigError(f"{cpath}: tasks: {slot!r} is not a slot like glue.0 or commonsense.1")
        if not isinstance(claim.arms, dict) or not all(isinstance(v, dict) or v is None for v in claim.arms.values()):
            raise ConfigError(f"{cpath}: arms: expected a mapping of arm name -> settings")
        for key in ("measures", "checks", "derived"):
            value = getattr(claim, key)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{cpath}: {key}: expected a list of mappings")
        if not isinstance(claim.base, dict) or not isinstance(claim.tasks, list):
            raise ConfigError(f"{cpath}: base must be a mapping and tasks a list")
        if claim.reference is not None and claim.reference not in claim.arms:
            raise ConfigError(f"{cpath}: reference: {claim.reference!r} names no arm of this claim")
        for arm, spec in claim.arms.items():
            if (spec or {}).get("lr_from") not in (None, *claim.arms):
                raise ConfigError(f"{cpath}: arms: {arm}: lr_from {spec['lr_from']!r} names no arm of this claim")
        for m in claim.measures:
            if m.get("name") not in MEASURES and m.get("name") not in TRAINING_MEASURES:
                raise ConfigError(f"{cpath}: measures: unknown measure {m.get('name')!r} "
                                  f"(known: {sorted(MEASURES) + sorted(TRAINING_MEASURES)})")
        from .verdicts import RULES

        for check in claim.checks:
            if check.get("rule") not in RULES:
                raise ConfigError(f"{cpath}: checks: rule {check.get('rule')!r} is not one of {sorted(RULES)}")
            for side in ("a", "b"):
                name = str(check.get(side, ""))
                if name.startswith("score:") and name[len("score:"):].split("@")[0] not in claim.arms:
                    raise ConfigError(f"{cpath}: checks: {side}: {name!r} names no arm of this claim")
            if check["rule"] in ("above", "below") and not isinstance(check.get("threshold"), (int, float)):
                raise ConfigError(f"{cpath}: checks: rule {check['rule']} needs a numeric threshold")
        claims.append(claim)
    if not claims:
        raise ConfigError(f"--suite: {folder} holds no c*.yaml claim files")
    return suite, claims


def discover_tasks(data_dir: str | None, prefer: dict | None = None) -> dict[str, list[str]]:
    """Task ids per family found in a data folder laid out like shared/datasets (preferred order first)."""
    from ..data import resolve_data_dir
    from ..data.glue import TASKS as GLUE_TASKS

    data_dir = resolve_data_dir(data_dir)
    found = {f: [] for f in FAMILIES}
    if data_dir is None:
        return found
    norm = lambda s: s.lower().replace("-", "").replace("_", "")
    glue = os.path.join(data_dir, "glue")
    if os.path.isdir(glue):
        for entry in sorted(os.listdir(glue)):
            if norm(entry) in GLUE_TASKS and os.path.exists(os.path.join(glue, entry, "train.tsv")):
                found["glue"].append(f"glue/{norm(entry)}")
    cs = os.path.join(data_dir, "commonsense")
    if os.path.isdir(cs):
        for entry in sorted(os.listdir(cs)):
            if all(os.path.exists(os.path.join(cs, entry, f)) for f in ("train.json", "test.json")):
                found["commonsense"].append(f"commonsense/{entry}")
    for family, order in (prefer or {}).items():
        rank = {norm(t.split("/")[-1]): i for i, t in enumerate(order)}
        found[family] = sorted(found.get(family, []), key=lambda t: (rank.get(norm(t.split("/")[-1]), len(rank)), t))
    return found


def parse_tasks(spec: str) -> dict[str, list[str]]:
    out = {f: [] for f in FAMILIES}
    for t in filter(None, (s.strip() for s in spec.split(","))):
        family = t.split("/")[0]
        if family not in FAMILIES:
            raise ConfigError(f"--tasks: {t!r} is not glue/<task> or commonsense/<name>")
        out[family].append(t)
    return out


def slot_task(tasks: dict[str, list[str]], slot: str) -> str | None:
    family, _, index = slot.partition(".")
    found = tasks.get(family) or []
    return found[int(index) % len(found)] if found else None
