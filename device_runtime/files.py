"""Reading a file or raising an error that names it: one wording for every reader.

Each caller keeps its own exception class (its exit code); the message is
``<what> <path>: cannot read (<reason>)``, or ``<what> <path> <missing>`` for a
file that does not exist when the caller words that case itself.
"""
from __future__ import annotations

from pathlib import Path


def read_bytes(path: str | Path, what: str, error: type[Exception], *,
               at_most: int = -1, missing: str | None = None) -> bytes:
    """The bytes of ``path`` (no more than ``at_most`` of them, when given: a caller with
    a size limit reads one byte past it to tell "too big"); ``error`` naming ``what`` and
    the path if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(at_most)
    except OSError as e:
        if missing is not None and isinstance(e, FileNotFoundError):
            raise error(f"{what} {path} {missing}") from None
        raise error(f"{what} {path}: cannot read ({e.strerror or e})") from None
