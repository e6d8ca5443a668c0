"""Ed25519 public keys as their raw 32 bytes, read without ``cryptography``.

``fedge secure init`` and ``fedge export`` write a trusted key as one PEM block
holding an Ed25519 SubjectPublicKeyInfo: a fixed 12-byte DER header and the 32-byte
key (RFC 8410). Reading that form directly spares ``fedge infer`` the import of
``cryptography`` (7 MB of a device's 60) whenever the manifest's signature is
already known good (``device_runtime.verified``); any other form is left to
``device_runtime.keys``, which names what it is.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path

from device_runtime.digest import sha256_hex
from device_runtime.errors import TrustError
from device_runtime.files import read_bytes

MAX_KEY_FILE = 64 * 1024  # a PEM key is ~120 bytes; never read a huge file as one
SPKI_ED25519 = bytes.fromhex("302a300506032b6570032100")


def read_key_file(path: str | Path, what: str, limit: int = MAX_KEY_FILE) -> bytes:
    """The bytes of key file ``path``, or TrustError naming it (missing, unreadable,
    larger than ``limit``)."""
    data = read_bytes(path, what, TrustError, at_most=limit + 1, missing="does not exist")
    if len(data) > limit:
        raise TrustError(f"{what} {path}: expected at most {limit} bytes")
    return data


def ed25519_raw(pem: bytes) -> bytes | None:
    """The 32 key bytes of a one-block "PUBLIC KEY" PEM holding an Ed25519 SPKI, else
    None (another form: let ``cryptography`` read it)."""
    lines = pem.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PUBLIC KEY-----" \
            or lines[-1] != b"-----END PUBLIC KEY-----":
        return None
    try:
        der = base64.b64decode(b"".join(lines[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(der) != 44 or not der.startswith(SPKI_ED25519):
        return None
    return der[12:]


def raw_key_id(raw: bytes) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    return sha256_hex(raw)[:16]
