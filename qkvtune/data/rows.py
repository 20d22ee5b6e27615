"""Rows of a split: held out (``validation_fraction``, ``val_size``), subsampled (``max_train_samples``,
``max_eval_samples``), and the text columns of a table chosen. Seeded, so every run of a seed cuts the same rows."""

from __future__ import annotations

import random

from ..errors import ConfigError, DataError

TEXT_GUESSES = ("text", "sentence", "prompt")  # predict's text column when none is configured


# --- cutting rows ------------------------------------------------------------------------------------------

def hold_out(n: int, k: int, seed) -> tuple[list[int], list[int]]:
    """(kept, held) row indices, in order: ``k`` of ``n`` rows held out, drawn by ``random.Random(seed)``."""
    held = set(random.Random(seed).sample(range(n), k))
    return [i for i in range(n) if i not in held], sorted(held)


def subsample(columns: dict[str, list], n: int | None, seed: int | None) -> dict[str, list]:
    """A seeded random subset of n rows (file order kept), or the first n rows when seed is None."""
    total = len(next(iter(columns.values())))
    if n is None or n >= total:
        return columns
    idx = list(range(n)) if seed is None else sorted(random.Random(seed).sample(range(total), n))
    return {k: [v[i] for i in idx] for k, v in columns.items()}


def split_train(columns: dict[str, list], max_train_samples: int | None, val_size: int | float | None,
                seed: int) -> tuple[dict[str, list], dict[str, list] | None]:
    """(training rows, validation rows or None): with ``val_size`` (a count, or a fraction in (0, 1)) a seeded
    validation split is carved out of the training rows first, and the training subset is drawn from the rest,
    so the two never share a row and ``max_train_samples`` still counts training rows."""
    if not val_size:
        return subsample(columns, max_train_samples, seed), None
    total = len(next(iter(columns.values())))
    k = round(total * val_size) if isinstance(val_size, float) else int(val_size)
    if not 1 <= k < total:
        raise DataError(f"val_size: {val_size!r} leaves no training rows or no validation rows of {total}")
    rest, held = hold_out(total, k, f"val_size:{seed}")
    pick = lambda idx: {c: [v[i] for i in idx] for c, v in columns.items()}
    return subsample(pick(rest), max_train_samples, seed), pick(held)


def record_splits(train: list, dev: list, spec, seed: int) -> tuple[list, dict[str, list], dict[str, list]]:
    """Records kept whole (TRL's text records) cut as every table's rows are: (training records, {evaluation
    split: records}, {test split: records}). With ``val_size`` the validation records come out of the training
    ones and the dev records are the test split; else the dev records are the one evaluation split. The first
    ``max_eval_samples`` dev records are kept."""
    kept, held = split_train({"i": list(range(len(train)))}, spec.max_train_samples, spec.val_size, seed)
    dev = [dev[i] for i in subsample({"i": list(range(len(dev)))}, spec.max_eval_samples, None)["i"]]
    chosen = [train[i] for i in kept["i"]]
    if held is not None:
        return chosen, {"validation": [train[i] for i in held["i"]]}, {"test": dev}
    return chosen, {"dev": dev}, {}


# --- columns -----------------------------------------------------------------------------------------------

def text_columns(given, columns, where: str, guess: bool = False) -> list[str]:
    """The text column(s) of a table with ``columns``: ``given`` (one, or two for a pair, as ``check`` allows),
    else — where ``guess`` (predict on a model that names none) — the first of text, sentence, prompt present.
    A column the table lacks is a ``DataError`` naming ``where`` and the columns it has."""
    wanted = [c.strip() for c in given.split(",")] if isinstance(given, str) else list(given or [])
    if not wanted and guess:
        wanted = [c for c in TEXT_GUESSES if c in columns][:1]
    if not 1 <= len(wanted) <= 2 or not all(isinstance(c, str) and c for c in wanted):
        raise ConfigError(f"text_columns: name the text column, or two for sentence pairs; the columns are "
                          f"{', '.join(map(str, columns))}" if not wanted else
                          f"text_columns: one column name, or two for sentence pairs; got {given!r}")
    for c in wanted:
        if c not in columns:
            raise DataError(f"{where}: no column {c!r}; the columns are {', '.join(map(str, columns))}")
    return wanted
