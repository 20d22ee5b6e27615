"""One error path: every failure caused by what a user supplied is a ``QkvtuneError``.

Its message is one line naming the key, file, row or path at fault. The command line catches this one
class (``cli.main``) and exits with code 2; anything else is a bug and keeps its traceback. Each layer
subclasses it under its own name (``ConfigError``, ``DataError``, ``AdapterError`` …) so callers of the
Python API can catch what they expect.
"""

from __future__ import annotations

import os


class QkvtuneError(ValueError):
    """A bad input (config value, file, model, adapter, output path); the message is one line."""

    def __init__(self, message: str):
        # one line, whatever a wrapped library message held
        super().__init__(" ".join(str(message).split()) if "\n" in str(message) else str(message))


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception message (its name when the message is empty), for quoting it
    inside one of ours."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


class ConfigError(QkvtuneError):
    """A configuration that cannot run; the message names the key."""


class DataError(QkvtuneError):
    """Bad or missing data. The message names the file and the row (1-based line number),
    JSON record (0-based index) or field at fault."""


class AdapterError(QkvtuneError):
    """An adapter file that does not fit the model (or is not a valid adapter)."""


class OutputError(QkvtuneError):
    """An output path that cannot be written (a file where a folder is wanted, no permission, …)."""


def check_output_dir(path: str, key: str = "output_dir") -> None:
    """Refuse, before any work, an output folder that is a file, lies under a file, or cannot be created
    or written. Creates nothing."""
    if not path:
        raise OutputError(f"{key}: must not be empty")
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"{key}: {path} is a file, not a folder")
    parent = path
    while not os.path.exists(parent):  # the nearest existing ancestor must be a writable folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{key}: {path} lies under {parent}, which is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{key}: {parent} is not writable")


def check_output_file(path: str, key: str) -> None:
    """Refuse an output file path that is a folder or whose folder cannot be written. Creates nothing."""
    if not path:
        raise OutputError(f"{key}: must not be empty")
    if os.path.isdir(path):
        raise OutputError(f"{key}: {path} is a folder, not a file")
    check_output_dir(os.path.dirname(os.path.abspath(path)), key)
