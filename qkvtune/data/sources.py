"""Where data lies and how its files are read: the data folder (``data_dir``, ``$QKVTUNE_DATA``, else the hub),
folders matched by a task's name, whole text files and JSON records, every failure a ``DataError`` naming the
file (and row). Below every family's loader: they read through here, and nothing here knows a family."""

from __future__ import annotations

import json
import os

from ..errors import DataError
from ..files import require_file


def normalise(name: str) -> str:
    """The one comparison form of a task or folder name: lower case, without '-' and '_' ("SST-2" -> "sst2")."""
    return name.lower().replace("-", "").replace("_", "")


def read_text(path: str, encoding: str = "utf-8") -> str:
    """The whole text of a data file, or a DataError naming it (missing, a folder, unreadable, not UTF-8)."""
    require_file(path, DataError)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None
    try:
        return raw.decode(encoding)
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path} row {line}: not UTF-8 text (byte {e.start})") from None


def resolve_data_dir(data_dir: str | None) -> str | None:
    """The argument, else $QKVTUNE_DATA, else None (meaning: the Hugging Face hub)."""
    data_dir = data_dir or os.environ.get("QKVTUNE_DATA") or None
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"{data_dir}: data folder not found")
    return data_dir


def local_dir(task: str, data_dir: str | None) -> str:
    """The data folder of a task that has no hub source."""
    data_dir = resolve_data_dir(data_dir)
    if data_dir is None:
        raise DataError(f"{task} has no hub source: pass data_dir or set QKVTUNE_DATA to the data folder")
    return data_dir


def find_dir(parent: str, name: str) -> str:
    """`parent/name`, matching the folder name by ``normalise`` (case, '-' and '_' ignored)."""
    path = os.path.join(parent, name)
    if os.path.isdir(path):
        return path
    if os.path.isdir(parent):
        for entry in sorted(os.listdir(parent)):
            if normalise(entry) == normalise(name) and os.path.isdir(os.path.join(parent, entry)):
                return os.path.join(parent, entry)
    raise DataError(f"{path}: folder not found")


def read_json_records(path: str, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> list[dict]:
    """A JSON list (or JSON lines) of objects with string fields; errors name file and record/line."""
    text = read_text(path)
    if not text.strip():
        raise DataError(f"{path}: empty file")
    if path.endswith(".jsonl"):
        records, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                records.append(_parse_json(line, path, f"line {n}"))
                where.append(f"line {n}")
    else:
        records = _parse_json(text, path, None)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
        where = [f"record {i}" for i in range(len(records))]
    if not records:
        raise DataError(f"{path}: no records")
    for rec, at in zip(records, where):
        if not isinstance(rec, dict):
            raise DataError(f"{path} {at}: expected an object, got {type(rec).__name__}")
        for key in required + tuple(k for k in optional if k in rec):
            if key not in rec:
                raise DataError(f"{path} {at}: missing key {key!r}")
            if not isinstance(rec[key], str):
                raise DataError(f"{path} {at}: {key!r} must be a string, got {type(rec[key]).__name__}")
            try:
                rec[key].encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate escape (\udc80): no text a tokenizer can take
                raise DataError(f"{path} {at}: {key!r} holds an invalid Unicode escape") from None
    return records


def first_json_record(path: str) -> dict | None:
    """The first record of a JSON list or JSON-lines file, or None where it has none or cannot be read (a cheap
    look at what a file holds, for finding tasks in a data folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                first = json.loads(f.readline())
            else:
                head = json.load(f)
                first = head[0] if isinstance(head, list) and head else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return first if isinstance(first, dict) else None


def _parse_json(text: str, path: str, at: str | None):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path} {at or f'line {e.lineno}'}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{path} {at or ''}: JSON nested too deeply".replace(" :", ":")) from None
