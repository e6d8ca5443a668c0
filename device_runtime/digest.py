"""SHA-256 on a device's start path, computed by cryptography rather than hashlib.

``fedge infer`` checks the manifest's Ed25519 signature with cryptography, whose Rust
module carries its own OpenSSL. ``hashlib`` would load a second one, the system's
libcrypto, which costs 3.7 MB of resident memory on x86_64 for hashing a few artifacts
(docs/results/startup.md): the manifest and key code hash with the module that is
loaded anyway. The digests are the same SHA-256 either way; other modules, off the
start path, keep hashlib.
"""
from __future__ import annotations

from typing import BinaryIO

from cryptography.hazmat.primitives.hashes import SHA256, Hash

_BLOCK = 1 << 20


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of ``data``, as 64 lowercase hex digits (hashlib's ``hexdigest``)."""
    h = Hash(SHA256())
    h.update(data)
    return h.finalize().hex()


def sha256_stream(f: BinaryIO) -> str:
    """The SHA-256 of what is left in the binary file ``f``, read in 1 MiB blocks."""
    h = Hash(SHA256())
    for block in iter(lambda: f.read(_BLOCK), b""):
        h.update(block)
    return h.finalize().hex()
