"""The task families, one file each in this folder (``family.Family`` is their contract), found by listing the
folder: adding a family is adding its file. ``family_of`` is the one answer to "what is this task id?";
``task_kind`` and ``main_metric`` are lookups through it."""

from __future__ import annotations

import functools
import importlib
import pkgutil

from ...errors import DataError
from ..family import Family


@functools.cache
def families() -> tuple[Family, ...]:
    """Every family, by name. Each module here declares its families as instances of ``Family`` subclasses in
    a module-level ``FAMILIES`` tuple."""
    found: dict[str, Family] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for fam in getattr(module, "FAMILIES", ()):
            if fam.name in found:
                raise RuntimeError(f"task family {fam.name!r} is declared twice ({module.__name__})")
            found[fam.name] = fam
    return tuple(found.values())


def find_family(task: str) -> Family | None:
    """The family that owns task id ``task``, or None."""
    return next((f for f in families() if f.owns(task)), None)


def family_of(task: str) -> Family:
    """The family that owns task id ``task``; a ``DataError`` listing every family's ids otherwise."""
    fam = find_family(task) if isinstance(task, str) else None
    if fam is None:
        ids = [f.usage or f.name for f in families()]
        raise DataError(f"task: unknown task {task!r}: expected {', '.join(ids[:-1])} or {ids[-1]}")
    return fam


def task_kind(task: str) -> str:
    """A task id's kind (``task.TASK_KINDS``), without loading its data."""
    return family_of(task).task_kind(task)


def main_metric(task: str) -> str:
    """The metric a task is judged by (the ``eval_``/``test_`` key without its prefix)."""
    return family_of(task).main_metric(task)


def offering(key: str) -> str:
    """The families that offer optional data key ``key``, for a message: "glue/…, sft or text/…"."""
    names = [f.short for f in families() if key in f.offers]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else "".join(names)


def family_named(name: str) -> Family:
    """The family called ``name`` (the first part of its ids)."""
    fam = next((f for f in families() if f.name == name.lower()), None)
    if fam is None:
        raise DataError(f"no task family {name!r}; the families are {', '.join(f.name for f in families())}")
    return fam


def discover_families() -> tuple[Family, ...]:
    """The families whose tasks are found in a data folder (``Family.discover``)."""
    return tuple(f for f in families() if type(f).discover is not Family.discover)


def discover(data_dir: str) -> dict[str, list[str]]:
    """family name -> the ids of its tasks a data folder holds, for every family that finds tasks that way."""
    return {f.name: f.discover(data_dir) for f in discover_families()}
