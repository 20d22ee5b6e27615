"""The claims suite's files: ``suite.yaml`` (seeds, shared and family settings, each family's reference arm,
learning-rate grids and their bounds, the gate, budgets, profiles) and one ``c*.yaml`` per claim, read and
checked; task slots (``glue.0``, ``commonsense.1``, ``sft.0``, or by kind: ``glue.regression.0``) resolved against
the tasks a data folder holds. The format is described in ``claims.py``."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass, field

from ..config import ConfigError, read_yaml
from .measures import MEASURES, TRAINING_MEASURES

CLAIM_KEYS = {"id", "title", "source", "paper", "tasks", "base", "arms", "measures", "checks", "derived", "notes",
              "reference", "quotes", "conclusion"}
SUITE_KEYS = {"seeds", "base", "families", "prefer", "lr_grid", "lr_bounds", "gate", "not_learned", "rising",
              "profiles", "budgets", "reference"}


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
    paper: str | list = ""  # a line, or quotes: {table, row, cells} of papers.md's tables, {text, source}
    base: dict = field(default_factory=dict)
    measures: list[dict] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)
    derived: list[dict] = field(default_factory=list)
    notes: str = ""
    reference: str | None = None
    quotes: list[dict] = field(default_factory=list)  # the papers' words and numbers, each naming its source row
    conclusion: dict = field(default_factory=dict)  # how the report words the answer (C10: which source it supports)
    path: str = ""
    dropped: list[str] = field(default_factory=list)  # arms a profile left out (``arms:``)

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
        for slot in claim.tasks + [m["only_task"] for m in claim.measures if isinstance(m, dict) and m.get("only_task")]:
            if not valid_slot(str(slot)):
                raise ConfigError(f"{cpath}: tasks: {slot!r} is not a slot like glue.0, commonsense.1 or "
                                  "glue.regression.0")
        if not isinstance(claim.arms, dict) or not all(isinstance(v, dict) or v is None for v in claim.arms.values()):
            raise ConfigError(f"{cpath}: arms: expected a mapping of arm name -> settings")
        for key in ("measures", "checks", "derived"):
            value = getattr(claim, key)
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{cpath}: {key}: expected a list of mappings")
        if not isinstance(claim.base, dict) or not isinstance(claim.tasks, list):
            raise ConfigError(f"{cpath}: base must be a mapping and tasks a list")
        if not isinstance(claim.paper, (str, list)) or isinstance(claim.paper, list) and not all(
                isinstance(q, dict) and ("text" in q or {"table", "row", "cells"} <= set(q)) for q in claim.paper):
            raise ConfigError(f"{cpath}: paper: a line of text, or quotes {{table, row, cells}} / {{text, source}}")
        if claim.reference is not None and claim.reference not in claim.arms:
            raise ConfigError(f"{cpath}: reference: {claim.reference!r} names no arm of this claim")
        for arm, spec in claim.arms.items():
            for key in ("lr_from", "params_from", "steps_from"):
                if (spec or {}).get(key) not in (None, *claim.arms):
                    raise ConfigError(f"{cpath}: arms: {arm}: {key} {spec[key]!r} names no arm of this claim")
        for m in claim.measures:
            if m.get("name") not in MEASURES and m.get("name") not in TRAINING_MEASURES:
                raise ConfigError(f"{cpath}: measures: unknown measure {m.get('name')!r} "
                                  f"(known: {sorted(MEASURES) + sorted(TRAINING_MEASURES)})")
        from .verdicts import RULES

        for check in claim.checks:
            if "task" in check and not valid_slot(str(check["task"])):
                raise ConfigError(f"{cpath}: checks: task {check['task']!r} is not a slot like glue.0")
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
    number = lambda c: (int(c.id[1:]) if c.id[1:].isdigit() else math.inf, c.id)
    return suite, sorted(claims, key=number)  # C1, C2, …, C10 (not the files' C1, C10, C2 order)


def suite_families() -> tuple[str, ...]:
    """The task families whose tasks a data folder holds (``Family.discover``): the suite's task slots."""
    from ..data.families import discover_families

    return tuple(f.name for f in discover_families())


def valid_slot(slot: str) -> bool:
    """``family.i`` (the i-th task of a family found) or ``family.kind.i`` (the i-th of its tasks of that kind)."""
    from ..task import TASK_KINDS

    parts = slot.split(".")
    return parts[0] in suite_families() and parts[-1].isdigit() and \
        (len(parts) == 2 or len(parts) == 3 and parts[1] in TASK_KINDS)


def task_settings(task: str, data_dir: str | None) -> dict:
    """The run settings that name a suite task (its family's ``run_settings``: an sft file ``sft/<file>`` is
    ``task: sft`` with that file under ``<data_dir>/text/`` as its ``train_file``)."""
    from ..data.families import family_named

    return family_named(task.partition("/")[0]).run_settings(task, data_dir)


def discover_tasks(data_dir: str | None, prefer: dict | None = None) -> dict[str, list[str]]:
    """Task ids per family found in a data folder laid out like shared/datasets (each family's ``discover``:
    GLUE folders, LLM-Adapters tasks, sft record files under ``text/`` as ``sft/<file>``), preferred order first."""
    from ..data.families import discover
    from ..data.sources import normalise, resolve_data_dir

    data_dir = resolve_data_dir(data_dir)
    found = discover(data_dir) if data_dir is not None else {f: [] for f in suite_families()}
    for family, order in (prefer or {}).items():
        rank = {normalise(t.split("/")[-1]): i for i, t in enumerate(order)}
        found[family] = sorted(found.get(family, []),
                               key=lambda t: (rank.get(normalise(t.split("/")[-1]), len(rank)), t))
    return found


def parse_tasks(spec: str) -> dict[str, list[str]]:
    from ..data.families import discover_families

    fams = discover_families()
    out = {f.name: [] for f in fams}
    for t in filter(None, (s.strip() for s in spec.split(","))):
        family = t.split("/")[0]
        if family not in out:
            raise ConfigError(f"--tasks: {t!r} is not " + ", ".join(f.discovers for f in fams[:-1]) +
                              f" or {fams[-1].discovers}")
        out[family].append(t)
    return out


def slot_task(tasks: dict[str, list[str]], slot: str, all_tasks: dict[str, list[str]] | None = None) -> str | None:
    """The task a slot names: ``glue.1`` the second GLUE task taken (wrapping around within them); ``glue.regression.0``
    the first GLUE task of that kind among all found (a profile that takes one GLUE task still finds STS-B for a
    claim that needs a square loss), None if there is none."""
    parts = slot.split(".")
    family, index = parts[0], int(parts[-1])
    if len(parts) == 3:
        from ..data.families import task_kind

        found = [t for t in (all_tasks or tasks).get(family) or [] if task_kind(t) == parts[1]]
        return found[index] if index < len(found) else None
    found = tasks.get(family) or []
    return found[index % len(found)] if found else None
