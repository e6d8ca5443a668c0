"""A device's memory of the manifest signatures it has already checked.

``fedge infer`` runs once per request on a device that keeps the same export for
weeks; checking the manifest's Ed25519 signature on every start costs the import
of ``cryptography`` (7 MB of the process's peak, ~15 ms). So once a signature has
passed, the device records a token for it beside its export ledger
(``$FEDGE_HOME/verified-manifests.json``)::

    {"format": "fedge-verified/1", "tokens": ["<64 hex>", ...]}

A token is the sha256 of a domain tag, the trusted key's 32 raw bytes, the 64-byte
signature and the sha256 of the manifest's bytes: a changed byte of the manifest,
another signature or another trusted key make another token, and the full check
runs again. Nothing about the artifacts is cached: their sha256 values are checked
against the (verified) manifest on every load.

Trust: the file is as trusted as the ledger and the device key beside it, so it is
used only if this user owns it and no one else may write it (as ssh treats its
files); otherwise it is ignored and every start verifies. It is a cache: a missing,
damaged or unwritable file costs a verification, never a refusal, and it keeps the
last ``MAX_TOKENS`` tokens.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from device_runtime.digest import sha256_hex

FORMAT = "fedge-verified/1"
CACHE_NAME = "verified-manifests.json"
MAX_TOKENS = 64  # exports a device keeps at once, with room: rollouts replace them
MAX_BYTES = 16 * 1024
_TAG = b"fedge-verified/1\x00"


def token(raw_key: bytes, signature: bytes, data: bytes) -> str:
    """The token of ``signature`` over ``data`` by ``raw_key`` (the three together)."""
    return sha256_hex(_TAG + bytes(raw_key) + bytes(signature)
                      + bytes.fromhex(sha256_hex(data)))


def known(path: Path, tok: str) -> bool:
    """Whether ``tok`` is in the cache at ``path`` (False if the file is missing,
    damaged, or writable by anyone but this user, who must own it)."""
    return tok in _tokens(path)


def remember(path: Path, tok: str) -> None:
    """Add ``tok`` (best effort: a cache that cannot be written stays as it was)."""
    tokens = [t for t in _tokens(path) if t != tok][-(MAX_TOKENS - 1):] + [tok]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, "tokens": tokens}, f)
        os.replace(tmp, path)  # atomic: a reader sees the old list or the new one
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _tokens(path: Path) -> list[str]:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not _private(st):
                return []
            raw = f.read(MAX_BYTES + 1)
    except OSError:
        return []
    if len(raw) > MAX_BYTES:
        return []
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return []
    tokens = doc.get("tokens") if isinstance(doc, dict) and doc.get("format") == FORMAT \
        else None
    if not isinstance(tokens, list):
        return []
    return [t for t in tokens if isinstance(t, str) and len(t) == 64]


def _private(st: os.stat_result) -> bool:
    """A regular file of this user's that no group or other may write."""
    owner = not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
    return stat.S_ISREG(st.st_mode) and owner and not st.st_mode & 0o022
