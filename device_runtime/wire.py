"""The fedge wire format: one binary frame per message, and its strict decoder.

A frame is ``b"FDG1"``, the header length (uint32 LE), a UTF-8 JSON header and
the body, the tensors' raw little-endian buffers back to back. A signed frame
(header ``v: 2``) also carries ``auth`` in its header (the signer's key id, a
nonce and the addressee) and, between header and body, the 64-byte Ed25519
signature of everything before it; the header names the body's sha256, so the
signature covers a frame of any size at the cost of one hash. docs/protocol.md
has the layout, the fields and the order of the checks. The decoder trusts
nothing: it checks every length, dtype and shape against the bytes and against
``Expect`` (the plan) before it creates an array, and for any input it returns a
``Frame`` or raises ``WireError`` naming the field, expected and actual value.
``encode`` refuses what a decoder with the same ``Limits`` would refuse. No
pickle, eval or ``np.load``. ``split`` and ``Reassembler`` (chunking of frames
above a broker's payload limit) live in ``device_runtime.chunking``.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np

from device_runtime import keys
from device_runtime.errors import WireError
from device_runtime.strict_json import check_json, load_json, short
from device_runtime.wire_checks import (
    DTYPES,
    SIGNED_VERSION,
    SUPPORTED_VERSIONS,
    check_expect,
    check_header,
)

if TYPE_CHECKING:
    from device_runtime.keys import PublicKey, Signer

T = TypeVar("T")

MAGIC = b"FDG1"
PREFIX = 8  # magic + header length
VERSION = 1  # unsigned; a signed frame is SIGNED_VERSION
SIGNATURE = keys.SIGNATURE_BYTES
FLOAT_DTYPES = ("float16", "float32")
MAX_HEADER = 65536  # the format's ceiling; Limits can only lower it
_LITTLE = {d: np.dtype(d).newbyteorder("<") for d in DTYPES}
_NAMES = {np.dtype(d): d for d in DTYPES}  # native byte order


@dataclass(frozen=True)
class Limits:
    """Bounds the decoder checks before it allocates or reads anything."""

    max_header: int = MAX_HEADER
    max_tensors: int = 4096
    max_ndim: int = 8
    max_body: int = 512 * 1024 * 1024


@dataclass(frozen=True)
class TensorSpec:
    """One tensor as the plan expects it (a ``None`` in ``shape``: any length)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Expect:
    """What the receiver expects of a frame; ``None`` fields are not checked."""

    kind: str | None = None
    job: str | None = None
    round: int | None = None
    devices: frozenset[str] | None = None  # known device ids
    codec: str | None = None
    tensors: dict[str, TensorSpec] | None = None  # exact set of names, dtype and shape each
    nonce: str | None = None  # a signed frame's auth.nonce
    to: str | None = None  # a signed frame's auth.to


@dataclass(frozen=True)
class Frame:
    """One message. Decoded arrays are native-endian, writable copies.

    ``params`` holds per-tensor codec parameters. ``encode`` writes ``{}`` for a
    tensor missing from it; ``decode`` returns an entry for every tensor, so a
    codec can index ``params[name]`` without a guard.
    """

    kind: str
    job: str
    round: int
    device: str
    codec: str = "fp32"
    tensors: dict[str, np.ndarray] = field(default_factory=dict)  # insertion order kept
    params: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    chunk: dict | None = None
    nonce: str = ""  # signed frames: what it answers or belongs to (a task's nonce)
    to: str = ""  # signed frames: the addressee, "" for anyone of the job
    key: str = ""  # decoded signed frames: the signer's key id


# --- encoding ---------------------------------------------------------------

def encode(frame: Frame, limits: Limits = Limits(), signer: Signer | None = None) -> bytes:
    """The frame's bytes, signed by ``signer`` if given (version 2, with ``frame.nonce``
    and ``frame.to`` in ``auth``); refuses what ``decode`` would refuse."""
    if not isinstance(frame.tensors, dict) or not isinstance(frame.params, dict):
        raise WireError(f"frame.tensors, frame.params: expected dicts, got "
                        f"{type(frame.tensors).__name__}, {type(frame.params).__name__}")
    for key in frame.params:
        if key not in frame.tensors:
            raise WireError(f"frame.params: expected keys among the tensor names, got "
                            f"{short(key)}")
    arrays = [_wire_array(name, value) for name, value in frame.tensors.items()]
    entries, offset = [], 0
    for name, (arr, dtype) in zip(frame.tensors, arrays):
        entries.append({"name": name, "dtype": dtype, "shape": list(arr.shape),
                        "offset": offset, "nbytes": arr.nbytes,
                        "params": frame.params.get(name, {})})
        offset += arr.nbytes
    body = bytearray(offset)
    for (arr, dtype), entry in zip(arrays, entries):
        if arr.size:  # assignment converts to the little-endian view's byte order
            np.frombuffer(body, _LITTLE[dtype], arr.size,
                          entry["offset"]).reshape(arr.shape)[...] = arr
    _check_body_finite(body, entries)
    header = {"v": SIGNED_VERSION if signer else VERSION, "kind": frame.kind,
              "job": frame.job, "round": frame.round, "device": frame.device, "codec": frame.codec,
              "sha256": hashlib.sha256(body).hexdigest(), "tensors": entries,
              "meta": frame.meta}
    if frame.chunk is not None:
        header["chunk"] = frame.chunk
    if signer is not None:
        header["auth"] = {"key": signer.key_id, "nonce": frame.nonce, "to": frame.to}
    elif frame.nonce or frame.to:
        raise WireError("frame.nonce, frame.to: expected empty in an unsigned frame "
                        "(they are bound by the signature)")
    # The caller's values (meta, chunk, params); the rest is built here from checked ones
    # (check_header types them): walking every tensor entry cost more than the hash.
    for key in ("kind", "job", "round", "device", "codec", "meta", "chunk", "auth"):
        if key in header:
            check_json(header[key], f"header.{key}", 2)
    for i, entry in enumerate(entries):
        if entry["params"]:
            check_json(entry["params"], f"header.tensors[{i}].params", 4)
    check_header(header, len(body), limits)
    # ASCII-only JSON: lone surrogates in a str cannot break the UTF-8 encoding.
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    max_header = min(limits.max_header, MAX_HEADER)
    if len(raw) > max_header:
        raise WireError(f"header length: expected at most {max_header} bytes, got {len(raw)} "
                        f"({len(entries)} tensors; move bulky params or meta into tensors)")
    signed = b"".join((MAGIC, struct.pack("<I", len(raw)), raw))
    return b"".join((signed, signer.sign(signed) if signer else b"", body))


def _wire_array(name: object, value: object) -> tuple[np.ndarray, str]:
    """The array and its dtype's name (finiteness is checked on the body, in runs)."""
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor name: expected a non-empty string, got {short(name)}")
    arr = np.asarray(value)
    dtype = _NAMES.get(arr.dtype) or arr.dtype.name  # .name costs ~4 us a call
    if dtype not in DTYPES:
        raise WireError(f"tensor {name!r}.dtype: expected one of {', '.join(DTYPES)}, "
                        f"got {arr.dtype}")
    return arr, dtype


# --- decoding ---------------------------------------------------------------

def decode(data: bytes | bytearray | memoryview, expect: Expect | None = None,
           limits: Limits = Limits(), key: PublicKey | None = None) -> Frame:
    """The frame in ``data``, checked in the order docs/protocol.md lists; with ``key``,
    it must be a frame signed by that key.

    ``data`` must not change during the call; the arrays returned are copies.
    """
    return _guarded(lambda: _decode(data, expect, limits, key))


def verify(data: bytes | bytearray | memoryview, key: PublicKey | None,
           expect: Expect | None = None, limits: Limits = Limits(), body: bool = True) -> dict:
    """The header of a frame signed by ``key`` whose body matches it, without creating
    any array: what a receiver checks before it holds or queues a message. ``body=False``
    skips the body's sha256, for a caller that decodes the frame next (a chunk)."""
    def run() -> dict:
        header, _ = _authentic(_byte_view(data), key, limits, body)
        if expect is not None:
            check_expect(header, expect)
        return header
    return _guarded(run)


def open_frame(data: bytes | bytearray | memoryview, expect: Expect | None = None,
               limits: Limits = Limits(), header: dict | None = None
               ) -> tuple[dict, memoryview]:
    """The validated header and the body (a view into ``data``) of a frame whose body
    matches its header's sha256, without creating an array: for a caller that takes
    the body as bytes (the reassembler, a chunk's payload). No signature is checked.
    ``header``: the header as ``peek_header`` or ``signed_digest`` validated it from
    these same bytes (a transport's gate did), not parsed again."""
    def run() -> tuple[dict, memoryview]:
        view = _byte_view(data)
        if header is None:
            checked, body = _authentic(view, None, limits)
        else:
            (h,) = struct.unpack_from("<I", view, 4)
            checked = header
            body = view[PREFIX + h + (SIGNATURE if header["v"] == SIGNED_VERSION else 0):]
            _check_body_sha(body, header)
        if expect is not None:
            check_expect(checked, expect)
        return checked, body
    return _guarded(run)


def signed_digest(data: bytes | bytearray | memoryview, limits: Limits = Limits()
                  ) -> tuple[dict, str]:
    """The validated header and the first 32 hex digits of the sha256 of the frame's
    signed bytes (magic, length, header): what a chunked message's chunk 0 names each
    other chunk by (``device_runtime.chunk_auth``). Neither signature nor body is checked."""
    def run() -> tuple[dict, str]:
        view = _byte_view(data)
        header, _ = _parse(view, limits)
        (h,) = struct.unpack_from("<I", view, 4)
        return header, hashlib.sha256(view[:PREFIX + h]).hexdigest()[:32]
    return _guarded(run)


def check_signature(data: bytes | bytearray | memoryview, header: dict, key: PublicKey
                    ) -> None:
    """WireError unless ``data`` (whose validated header is ``header``, from
    ``signed_digest`` or ``peek_header``) is signed by ``key``: the check ``verify``
    makes, without parsing the header again."""
    if keys.BENCH_ONLY_SKIP_SIGNATURES:
        return
    _guarded(lambda: _check_signature(_byte_view(data), header, key))


def peek_header(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> dict:
    """The validated header, for routing; neither signature nor body is checked."""
    return _guarded(lambda: _parse(_byte_view(data), limits)[0])


def content_sha(data: bytes | bytearray | memoryview) -> str:
    """The sha256 of the frame's body, as its header names it: what a task names a
    model by (a device that rebuilds the model locally builds the same body)."""
    return peek_header(data)["sha256"]


def _guarded(run: Callable[[], T]) -> T:
    try:
        return run()
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed frame must never crash a receiver
        raise WireError(f"frame: undecodable ({type(e).__name__}: {e})") from e


def _decode(data: object, expect: Expect | None, limits: Limits, key: PublicKey | None
            ) -> Frame:
    header, body = _authentic(_byte_view(data), key, limits)
    if expect is not None:
        check_expect(header, expect)
    _check_body_finite(body, header["tensors"])
    tensors = _arrays(body, header["tensors"])
    params = {t["name"]: t["params"] for t in header["tensors"]}
    auth = header.get("auth", {})
    return Frame(header["kind"], header["job"], header["round"], header["device"],
                 header["codec"], tensors, params, header["meta"], header.get("chunk"),
                 auth.get("nonce", ""), auth.get("to", ""), auth.get("key", ""))


def _authentic(view: memoryview, key: PublicKey | None, limits: Limits, check_body=True
               ) -> tuple[dict, memoryview]:
    """Header and body, the signature checked first (with ``key``), then the body's sha256."""
    header, body = _parse(view, limits)
    if key is not None and not keys.BENCH_ONLY_SKIP_SIGNATURES:
        _check_signature(view, header, key)
    if check_body:
        _check_body_sha(body, header)
    return header, body


def _check_body_sha(body: memoryview, header: dict) -> None:
    digest = hashlib.sha256(body).hexdigest()
    if digest != header["sha256"]:
        raise WireError(f"header.sha256: expected the body's sha256 {digest[:16]}..., got "
                        f"{header['sha256'][:16]}...")


def _check_signature(view: memoryview, header: dict, key: PublicKey) -> None:
    if header["v"] != SIGNED_VERSION:
        raise WireError(f"header.v: expected a signed frame (version {SIGNED_VERSION}), got "
                        f"version {header['v']} (unsigned)")
    if header["auth"]["key"] != key.key_id:
        raise WireError(f"header.auth.key: expected {key.key_id} (the trusted key), got "
                        f"{short(header['auth']['key'])} (signed by another key)")
    (h,) = struct.unpack_from("<I", view, 4)
    signature = bytes(view[PREFIX + h:PREFIX + h + SIGNATURE])
    if not key.verify(signature, bytes(view[:PREFIX + h])):
        raise WireError(f"signature: expected a valid signature by {key.key_id}, got one "
                        "that does not verify (the frame was changed after signing)")


def _byte_view(data: object) -> memoryview:
    try:
        view = memoryview(data)  # type: ignore[arg-type]
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    except (TypeError, ValueError):
        raise WireError(f"frame: expected bytes, bytearray or a contiguous memoryview, "
                        f"got {type(data).__name__}") from None


def _parse(view: memoryview, limits: Limits) -> tuple[dict, memoryview]:
    """Header and body of a frame, every length checked; nothing allocated but the header."""
    n = len(view)
    if n < PREFIX:
        raise WireError(f"frame length: expected at least {PREFIX} bytes, got {n}")
    if bytes(view[:4]) != MAGIC:
        raise WireError(f"frame magic: expected {MAGIC!r}, got {bytes(view[:4])!r}")
    (h,) = struct.unpack_from("<I", view, 4)
    max_header = min(limits.max_header, MAX_HEADER)
    if h > max_header:
        raise WireError(f"header length: expected at most {max_header}, got {h}")
    if PREFIX + h > n:
        raise WireError(f"header length: expected at most {n - PREFIX} (the bytes after the "
                        f"prefix), got {h}")
    header = load_json(view[PREFIX:PREFIX + h])
    start = PREFIX + h
    if isinstance(header, dict) and header.get("v") == SIGNED_VERSION:
        if start + SIGNATURE > n:
            raise WireError(f"signature: expected {SIGNATURE} bytes after the header, got "
                            f"{n - start}")
        start += SIGNATURE
    body = view[start:]
    check_header(header, len(body), limits)
    return header, body


def _arrays(body: memoryview, entries: list[dict]) -> dict[str, np.ndarray]:
    """The tensors, independent of ``data`` (which a caller may reuse) and writable: on a
    little-endian machine, views of one copy of the body (one copy, not one a tensor)
    when every tensor's offset suits its dtype; else a copy each."""
    if not _NATIVE_LITTLE or any(t["offset"] % _LITTLE[t["dtype"]].itemsize
                                 for t in entries):
        return {t["name"]: _array(body, t) for t in entries}
    own = bytearray(body)
    return {t["name"]: np.frombuffer(own, _LITTLE[t["dtype"]], math.prod(t["shape"]),
                                     t["offset"]).reshape(t["shape"]) for t in entries}


_NATIVE_LITTLE = sys.byteorder == "little"


def _array(body: memoryview, t: dict) -> np.ndarray:
    """A native-endian copy: independent of ``data`` (which a caller may reuse) and writable."""
    shape = tuple(t["shape"])
    view = np.frombuffer(body, _LITTLE[t["dtype"]], math.prod(shape), t["offset"]).reshape(shape)
    return view.astype(view.dtype.newbyteorder("="), copy=True)


def _check_body_finite(body: bytearray | memoryview, entries: list[dict]) -> None:
    """Every float tensor of a frame's body finite, checked a run of neighbouring
    tensors of one float dtype at a time (a frame of many small tensors costs one
    call, not one per tensor); the error names the first tensor at fault."""
    run: list[dict] = []
    for t in [*entries, None]:
        if run and (t is None or t["dtype"] != run[0]["dtype"]):
            first, size = run[0], sum(e["nbytes"] for e in run)
            dt = _LITTLE[first["dtype"]]
            if not np.isfinite(np.frombuffer(body, dt, size // dt.itemsize,
                                             first["offset"])).all():
                for e in run:  # the slow path, only for a frame to be refused
                    _check_finite(np.frombuffer(body, dt, e["nbytes"] // dt.itemsize,
                                                e["offset"]), e["name"])
            run = []
        if t is not None and t["dtype"] in FLOAT_DTYPES and t["nbytes"]:
            run.append(t)


def _check_finite(arr: np.ndarray, name: str) -> None:
    if np.isfinite(arr).all():
        return
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    first = int(np.flatnonzero(~np.isfinite(arr))[0])
    raise WireError(f"tensor {short(name)}: expected finite values, got {n_nan} NaN and "
                    f"{n_inf} Inf (first at flat index {first})")


__all__ = ["MAGIC", "SUPPORTED_VERSIONS", "SIGNED_VERSION", "DTYPES", "MAX_HEADER", "Limits",
           "TensorSpec", "Expect", "Frame", "encode", "decode", "verify", "peek_header",
           "signed_digest", "check_signature", "content_sha", "open_frame"]
