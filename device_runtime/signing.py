"""Ed25519 signatures on the export manifest, as a device checks them (no torch).

``fedge export`` signs the exact bytes of ``manifest.json`` with the server's
private key and writes the detached signature beside it, ``manifest.json.sig``::

    {"format": "fedge-signature/1", "alg": "ed25519",
     "key_id": "<16 hex digits>", "signature": "<base64 of 64 bytes>"}

``key_id`` is the first 16 hex digits of the sha256 of the 32 raw public-key
bytes: it tells "signed by another key" apart from "modified after signing".
A device trusts one public key (a PEM SubjectPublicKeyInfo file); since the
manifest lists every artifact's sha256, a verified manifest vouches for every
artifact whose bytes match it. The toolkit (``toolkit.deploy.signing``) is the writer;
this module is the one reader.
"""
from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path
from typing import Callable

from device_runtime import verified
from device_runtime.errors import SignatureError
from device_runtime.files import read_bytes
from device_runtime.raw_keys import ed25519_raw, raw_key_id, read_key_file

SIG_FORMAT = "fedge-signature/1"
ALG = "ed25519"
MAX_SIG_BYTES = 4096  # a signature file is ~200 bytes; never read a huge one
_HEX = set("0123456789abcdef")


def signature_path(manifest_path: str | Path) -> Path:
    """Where the detached signature of ``manifest_path`` lives: ``<manifest>.sig``."""
    manifest_path = Path(manifest_path)
    return manifest_path.with_name(manifest_path.name + ".sig")


def verify_manifest(manifest_path: str | Path, public_key_path: str | Path) -> str:
    """Check ``manifest_path`` against its ``.sig`` and the trusted key; returns the key id.

    Every failure raises SignatureError (exit code 6) naming the file and what
    is wrong. A caller that then reads the manifest should parse the bytes it
    verified (``load_manifest(path, trust=...)`` does), not read the file again.
    """
    manifest_path = Path(manifest_path)
    data = read_bytes(manifest_path, "manifest", SignatureError)
    return verify_bytes(data, manifest_path, public_key_path)


def verify_bytes(data: bytes, manifest_path: str | Path,
                 public_key_path: str | Path, cache: Path | None = None) -> str:
    """Check ``data`` (the bytes of ``manifest_path``) against the signature beside that
    file and the trusted key; returns the key id. With ``cache`` (a device's
    ``device_runtime.verified`` file), a signature checked before is taken as checked
    (without importing cryptography) and a newly checked one is recorded."""
    manifest_path = Path(manifest_path)
    raw_key = _trusted_raw(public_key_path)
    trusted_id = raw_key_id(raw_key)
    sig_path = signature_path(manifest_path)
    doc = _read_signature(sig_path, manifest_path)
    if doc["key_id"] != trusted_id:
        raise SignatureError(f"manifest {manifest_path} is signed by key {doc['key_id']}, "
                             f"not by the trusted key {trusted_id} ({public_key_path})")
    tok = verified.token(raw_key, doc["signature"], data) if cache is not None else ""
    if cache is not None and verified.known(cache, tok):
        return trusted_id
    if not _ed25519_valid(raw_key, doc["signature"], data):
        raise SignatureError(f"manifest {manifest_path} does not match its signature "
                             f"{sig_path.name} (key {trusted_id}): modified after "
                             "signing")
    if cache is not None:
        verified.remember(cache, tok)
    return trusted_id


def _ed25519_valid(raw_key: bytes, signature: bytes, data: bytes) -> bool:
    # cryptography is imported here, only when a check runs: 7 MB of a device's start
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw_key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _trusted_raw(path: str | Path) -> bytes:
    """The trusted key's 32 raw bytes: read directly from the PEM fedge writes, or by
    ``device_runtime.keys`` (cryptography) for any other form, which it names."""
    raw = ed25519_raw(read_key_file(path, "trusted key"))
    if raw is not None:
        return raw
    from device_runtime.keys import load_public_key

    return load_public_key(path).public_bytes_raw()


def parse_document(raw: bytes, fmt: str, bad: Callable[[str], Exception]) -> dict:
    """A small JSON object whose ``format`` is ``fmt`` (signature, ledger); ``bad(why)``
    builds the error that names the file."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise bad("not a JSON document") from None
    if not isinstance(doc, dict):
        raise bad(f"expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != fmt:
        raise bad(f"format: expected {fmt!r}, got {doc.get('format')!r}")
    return doc


def _read_signature(sig_path: Path, manifest_path: Path) -> dict:
    """The parsed signature file: key_id (str) and signature (64 bytes)."""
    raw = read_bytes(sig_path, "signature", SignatureError, at_most=MAX_SIG_BYTES + 1,
                     missing=f"is missing: manifest {manifest_path} is not signed")

    def bad(why: str) -> SignatureError:
        return SignatureError(f"signature {sig_path} is malformed: {why}")
    if len(raw) > MAX_SIG_BYTES:
        raise bad(f"expected at most {MAX_SIG_BYTES} bytes")
    doc = parse_document(raw, SIG_FORMAT, bad)
    if doc.get("alg") != ALG:
        raise bad(f"alg: expected {ALG!r}, got {doc.get('alg')!r}")
    kid, sig = doc.get("key_id"), doc.get("signature")
    if not isinstance(kid, str) or len(kid) != 16 or not set(kid) <= _HEX:
        raise bad(f"key_id: expected 16 lowercase hex digits, got {str(kid)[:40]!r}")
    if not isinstance(sig, str):
        raise bad(f"signature: expected a base64 string, got {type(sig).__name__}")
    try:
        sig_bytes = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        raise bad("signature: not valid base64") from None
    if len(sig_bytes) != 64:
        raise bad(f"signature: expected 64 bytes, got {len(sig_bytes)}")
    return {"key_id": kid, "signature": sig_bytes}
