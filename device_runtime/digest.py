"""SHA-256 on a device's start path, computed by the interpreter's own module.

``hashlib`` loads the system's OpenSSL (libcrypto): 3.7 MB of resident memory on
x86_64, a sixteenth of what ``fedge infer`` may take (docs/results/startup.md), for
hashing a manifest and an artifact or two. CPython's built-in SHA-256 (``_sha256``;
``_sha2`` from 3.12) costs 0.2 MB and hashes ~240 MB/s here (OpenSSL: ~1.7 GB/s), a
few ms for a device's artifacts; inputs past ``LARGE`` go to hashlib, where the
speed is worth the memory. The digests are the same SHA-256 either way; other
modules, off the start path, keep hashlib.
"""
from __future__ import annotations

from typing import BinaryIO, Callable

_BLOCK = 1 << 20
LARGE = 32 << 20  # bytes: above this, OpenSSL's speed is worth its 3.7 MB


def _builtin() -> Callable:
    try:
        from _sha2 import sha256  # CPython >= 3.12
    except ImportError:
        try:
            from _sha256 import sha256  # CPython 3.11
        except ImportError:  # an interpreter without them: hashlib's is the same digest
            from hashlib import sha256
    return sha256


_sha256 = _builtin()


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, as 64 lowercase hex digits (hashlib's ``hexdigest``)."""
    if len(data) > LARGE:
        import hashlib

        return hashlib.sha256(data).hexdigest()
    return _sha256(data).hexdigest()


def sha256_stream(f: BinaryIO) -> str:
    """The SHA-256 of what is left in the binary file ``f``, read in 1 MiB blocks."""
    h = _sha256()
    for block in iter(lambda: f.read(_BLOCK), b""):
        h.update(block)
    return h.hexdigest()
