"""Raw-byte mutations of an input file, shared by the fault tests."""

import os
import random


def mutations(data: bytes, seed: str, flips: int = 5):
    """(label, new bytes) pairs: empty, truncations, flipped bits, invalid UTF-8, a NUL byte; then
    (``"folder"``, None) for a folder in the file's place and (``"missing"``, ...) for no file at all."""
    rng = random.Random(seed)
    n = len(data)
    yield "empty", b""
    for cut in sorted({1, n // 3, n // 2, n - 1}):
        yield f"truncated at {cut}", data[:cut]
    for _ in range(flips):
        pos = rng.randrange(n)
        yield f"byte {pos} flipped", data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1:]
    yield "invalid UTF-8", data[: n // 2] + b"\xff\xfe\xc3" + data[n // 2:]
    yield "NUL byte", data[: n // 2] + b"\x00" + data[n // 2:]
    yield "folder", None
    yield "missing", ...


def apply(path: str, mutation) -> None:
    """Put ``mutation`` (from ``mutations``) in place of the file at ``path``."""
    os.remove(path)
    if mutation is None:
        os.mkdir(path)
    elif mutation is not ...:
        with open(path, "wb") as f:
            f.write(mutation)
