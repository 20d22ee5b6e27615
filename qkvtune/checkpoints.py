"""Crash-safe run folders: a lock per output_dir, and checkpoints that count only once complete.

Trainer writes a checkpoint as several files (adapter, optimizer, scheduler, RNG, trainer state). After
the last one is written and fsynced, qkvtune adds ``qkvtune_checkpoint.json`` — the sha256 of every file —
with an atomic rename. A checkpoint without a valid manifest (the job was killed while writing it, or a
file was changed since) is never resumed from. The lock is an ``flock`` on ``output_dir/.qkvtune.lock``:
the kernel drops it when the process dies, even under SIGKILL, so a stale lock can never block a resume.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil

from .errors import OutputError, QkvtuneError
from .files import read_json, sha256_file, write_json

MANIFEST = "qkvtune_checkpoint.json"
LOCK = ".qkvtune.lock"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunLockedError(QkvtuneError):
    """Another process is writing to the same output_dir."""


class CheckpointError(QkvtuneError):
    """A checkpoint that cannot be resumed from."""


def lock_output_dir(output_dir: str):
    """Take the run lock (returns the open file; keep it alive for the run's lifetime)."""
    try:  # a path the access check let through can still refuse a folder (/proc, a read-only mount)
        os.makedirs(output_dir, exist_ok=True)
        handle = open(os.path.join(output_dir, LOCK), "a+")
    except OSError as e:
        raise OutputError(f"output_dir: {output_dir} cannot be written ({e.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLockedError(f"output_dir {output_dir}: another qkvtune run is writing there") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def seal(checkpoint_dir: str) -> None:
    """Mark a fully written checkpoint complete: fsync its files, then write the manifest atomically."""
    files = {}
    for name in sorted(os.listdir(checkpoint_dir)):
        path = os.path.join(checkpoint_dir, name)
        if name == MANIFEST or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = sha256_file(path)
    _fsync_dir(checkpoint_dir)
    write_json(os.path.join(checkpoint_dir, MANIFEST), {"files": files})
    _fsync_dir(checkpoint_dir)


def is_complete(checkpoint_dir: str) -> bool:
    path = os.path.join(checkpoint_dir, MANIFEST)
    if not os.path.isfile(path):
        return False
    try:
        files = read_json(path)["files"]
        return all(sha256_file(os.path.join(checkpoint_dir, n)) == h for n, h in files.items())
    except (ValueError, KeyError, OSError, TypeError):
        return False


def checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders by step, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(output_dir) if (m := _CHECKPOINT.match(n))
             and os.path.isdir(os.path.join(output_dir, n))]
    return [os.path.join(output_dir, n) for _, n in sorted(found)]


def last_complete(output_dir: str, remove_incomplete: bool = False) -> str | None:
    """The newest complete checkpoint; incomplete newer ones are removed when asked (they are garbage)."""
    for path in reversed(checkpoints(output_dir)):
        if is_complete(path):
            return path
        if remove_incomplete:
            shutil.rmtree(path, ignore_errors=True)
    return None


def check_resumable(path: str) -> str:
    if not os.path.isdir(path):
        raise CheckpointError(f"resume: {path} is not a checkpoint folder")
    if not is_complete(path):
        raise CheckpointError(f"resume: {path} is incomplete or was modified (no valid {MANIFEST})")
    return path


# --- what a finished Trainer run recorded ---------------------------------------------------------------

def _last_state(run_dir: str) -> dict | None:
    """trainer_state.json of the run's newest checkpoint (Trainer's record of evaluations and the best one)."""
    for ckpt in reversed(checkpoints(run_dir)):
        path = os.path.join(ckpt, "trainer_state.json")
        if os.path.exists(path):
            return read_json(path, CheckpointError)
    return None


def log_history(run_dir: str) -> list[dict]:
    """Trainer's log history (losses, evaluations) as of the run's newest checkpoint; [] without one."""
    state = _last_state(run_dir)
    history = (state or {}).get("log_history", [])
    return history if isinstance(history, list) else []


def best_step(run_dir: str) -> int | None:
    """The step of the run's best evaluation (Trainer's best checkpoint), or None."""
    state = _last_state(run_dir) or {}
    if isinstance(state.get("best_global_step"), int) and state["best_global_step"]:
        return state["best_global_step"]
    best = state.get("best_model_checkpoint")
    return int(best.rstrip("/").split("-")[-1]) if isinstance(best, str) and best else None
