"""File helpers every layer shares: atomic writes, JSON in and out, safetensors in and out, checksums.

Anything written goes to a temporary file in the same folder, is fsynced and renamed over the target, so a
reader never sees half a file and a crash leaves the old one. Reads name the file in one line when it is
missing, unreadable or of the wrong shape (``error`` is the caller's ``QkvtuneError`` subclass).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile

from .errors import QkvtuneError


def atomic_write(path: str, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's (and safetensors') 0600 would outlive the rename: as open() makes them
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def jsonable(obj):
    """Tensors, numpy scalars and tuples as JSON values; non-finite floats as null (JSON has no NaN)."""
    torch = sys.modules.get("torch")  # a tensor means torch is loaded: never import it here (config uses this)
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        return jsonable(obj.item())
    return obj


def write_json(path: str, obj) -> None:
    """``obj`` as indented JSON with sorted keys, atomically; missing folders are made (they appear only with
    results)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    obj = jsonable(obj)

    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")
    atomic_write(path, write)


def require_file(path: str, error: type[Exception] = QkvtuneError) -> None:
    """``error`` naming ``path`` unless it is an existing regular file."""
    if not os.path.exists(path):
        raise error(f"{path}: file not found")
    if not os.path.isfile(path):
        raise error(f"{path}: is not a file")


def read_json(path: str, error: type[Exception] = QkvtuneError, expect: type | tuple = dict):
    """JSON from ``path``, or ``error`` with a one-line message naming the file."""
    require_file(path, error)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise error(f"{path}: cannot be read ({e.strerror})") from None
    if not isinstance(obj, expect):
        raise error(f"{path}: expected a JSON {'object' if expect is dict else 'object or list'}")
    return obj


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_tensors(path: str, tensors: dict, metadata: dict | None = None) -> None:
    """A safetensors file, atomically."""
    from safetensors.torch import save_file

    # copies: safetensors reads through numpy, which pins a storage (FSDP must free gathered parameters after)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata or {"format": "pt"}))


def read_tensors(path: str, error: type[Exception] = QkvtuneError) -> dict:
    """Every tensor of a safetensors file (never a pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    require_file(path, error)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise error(f"{path}: not a readable safetensors file ({e})") from None
