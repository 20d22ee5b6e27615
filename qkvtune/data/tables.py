"""Your own tables: the rows of CSV, TSV, JSON, JSONL or Parquet files (chosen by extension) or of a dataset (a
hub id or a local folder), read through ``datasets``, each row remembering its file and row for messages; the
training/validation rows of a run on them (``train_file``/``validation_file``, ``dataset`` with its splits, else
a seeded ``validation_fraction`` held out); text, number and label columns read with every bad row named."""

from __future__ import annotations

import math
import os

import datasets
import numpy as np

from ..errors import DataError, first_line
from ..files import require_file
from .rows import hold_out

FORMATS = {".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}), ".json": ("json", {}),
           ".jsonl": ("json", {}), ".parquet": ("parquet", {})}


# --- reading --------------------------------------------------------------------------------------------

class Table:
    """Rows of one split with where each came from: (file, 1-based data row) for messages."""

    def __init__(self, columns: dict[str, list], where: list[tuple[str, int]]):
        self.columns, self.where = columns, where

    def at(self, i: int) -> str:
        path, row = self.where[i]
        return f"{path} row {row}"

    def select(self, idx: list[int]) -> "Table":
        return Table({c: [v[i] for i in idx] for c, v in self.columns.items()}, [self.where[i] for i in idx])


def _files(spec, key: str) -> list[str]:
    files = [spec] if isinstance(spec, str) else list(spec)
    if not files or not all(isinstance(f, str) and f for f in files):
        raise DataError(f"{key}: expected a file path or a list of them")
    for f in files:
        ext = os.path.splitext(f)[1].lower()
        if ext not in FORMATS:
            raise DataError(f"{f}: unsupported file type {ext or '(none)'} (expected {', '.join(FORMATS)})")
        require_file(f, DataError)
    return files


def read_file(path: str) -> dict[str, list]:
    """All columns of one data file, through ``datasets``' csv/json/parquet builders."""
    builder, kwargs = FORMATS[os.path.splitext(path)[1].lower()]
    try:
        ds = datasets.load_dataset(builder, data_files=os.path.abspath(path), split="train", **kwargs)
    except Exception as e:  # a third-party parser's many error types: a file it cannot read is a bad input
        cause = e.__cause__ or e.__context__ or e
        raise DataError(f"{path}: cannot be read as {builder} ({first_line(cause, 200)})") from None
    if len(ds) == 0:
        raise DataError(f"{path}: no data rows")
    return ds.to_dict()


def read_table(files, key: str) -> Table:
    columns: dict[str, list] | None = None
    where: list[tuple[str, int]] = []
    for path in _files(files, key):
        cols = read_file(path)
        if columns is not None and set(cols) != set(columns):
            raise DataError(f"{path}: columns {sorted(cols)} differ from the first file's {sorted(columns)}")
        columns = {k: (columns or {}).get(k, []) + v for k, v in cols.items()}
        where += [(path, i + 1) for i in range(len(next(iter(cols.values()))))]
    return Table(columns, where)


def read_dataset(name: str, config: str | None, split: str) -> Table:
    """A split of a hub dataset or a local dataset folder (``save_to_disk`` layout or data files)."""
    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_dict.json")):
            ds = datasets.load_from_disk(name)[split]
        elif os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, config, split=split)
    except KeyError:
        raise DataError(f"dataset {name}: has no split {split!r}") from None
    except Exception as e:  # not found offline, no such config or split, …
        raise DataError(f"dataset {name}: cannot load split {split!r} ({first_line(e, 200)})") from None
    where = [(f"dataset {name} [{split}]", i + 1) for i in range(len(ds))]
    return Table(ds.to_dict(), where)


def read_splits(spec, seed: int) -> tuple[Table, Table, str]:
    """(train, validation, where the training rows came from) for a task on the user's own data: files or a
    dataset, with a seeded ``validation_fraction`` of the training rows held out when no validation data
    (file or split) is given. With ``val_size`` those held-out rows are the test split, and they are drawn the
    same for every seed (seed 0), as a dev file would be: runs of several seeds answer the same test questions."""
    if spec.val_size:
        seed = 0
    if spec.train_file:
        train = read_table(spec.train_file, "train_file")
        source = train.where[0][0]
    elif spec.dataset:
        train = read_dataset(spec.dataset, spec.dataset_config, spec.train_split)
        source = f"dataset {spec.dataset}"
    else:
        raise DataError(f"task: {spec.task} needs train_file (CSV, TSV, JSON, JSONL or Parquet) or dataset")
    if spec.dataset and spec.validation_split:
        return train, read_dataset(spec.dataset, spec.dataset_config, spec.validation_split), source
    if spec.validation_file:
        return train, read_table(spec.validation_file, "validation_file"), source
    n = len(train.where)
    k = max(1, round(n * spec.validation_fraction))
    if n - k < 1:
        raise DataError(f"{source}: {n} rows are too few to hold out a validation set")
    kept, held = hold_out(n, k, seed)
    return train.select(kept), train.select(held), source


# --- columns and labels ---------------------------------------------------------------------------------

def check_columns(table: Table, needed: list[str], source: str) -> None:
    for c in needed:
        if c not in table.columns:
            raise DataError(f"{source}: no column {c!r}; the columns are {', '.join(map(str, table.columns))}")


def texts(table: Table, column: str) -> list[str]:
    """The column's texts; an empty or missing one is refused naming its file and row."""
    out = []
    for i, v in enumerate(table.columns[column]):
        if not isinstance(v, str) or not v.strip():
            raise DataError(f"{table.at(i)}: empty or missing text in column {column!r}")
        out.append(v)
    return out


def number(v, where: str, column: str) -> float:
    try:
        x = float(v) if not isinstance(v, bool) and v is not None else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x):
        raise DataError(f"{where}: {column} {v!r} is not a number")
    return x


def label_names(tables: list[Table], column: str, given: list | None) -> list[str]:
    """The class names in id order: ``given`` (checked by ``DataSpec.check``), else the sorted distinct values
    (numbers numerically)."""
    if given is not None:
        return [str(v) for v in given]
    values = {v for t in tables for v in t.columns[column] if v is not None}
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return [str(v) for v in sorted(values)]
    return sorted(str(v) for v in values)


def class_ids(table: Table, column: str, names: list[str]) -> list[int]:
    index = {n: i for i, n in enumerate(names)}
    out = []
    for i, v in enumerate(table.columns[column]):
        key = str(v) if v is not None else None
        if key not in index:
            raise DataError(f"{table.at(i)}: label {v!r} is not one of {', '.join(names)}")
        out.append(index[key])
    return out
