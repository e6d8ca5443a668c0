"""The fedge wire format: one binary frame per message, and its strict decoder.

A frame is ``b"FDG1"``, the header length (uint32 LE), a UTF-8 JSON header and
the body, the tensors' raw little-endian buffers back to back; docs/protocol.md
has the layout, the fields and the order of the checks. The decoder trusts
nothing: it checks every length, dtype and shape against the bytes and against
``Expect`` (the plan) before it creates an array, and for any input it returns a
``Frame`` or raises ``WireError`` naming the field, expected and actual value.
``encode`` refuses what a decoder with the same ``Limits`` would refuse. No
pickle, eval or ``np.load``. ``split`` and ``Reassembler`` (chunking of frames
above a broker's payload limit) live in ``device_runtime.chunking`` and are
importable from here too.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import numpy as np

from device_runtime.errors import WireError
from device_runtime.strict_json import JSON_NAMES, check_json, json_type, load_json, short

T = TypeVar("T")

MAGIC = b"FDG1"
PREFIX = 8  # magic + header length
VERSION = 1
SUPPORTED_VERSIONS = (1,)
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "uint32")
FLOAT_DTYPES = ("float16", "float32")
MAX_HEADER = 65536  # the format's ceiling; Limits can only lower it

# Fields every header carries, with their JSON type; "chunk" is optional.
_REQUIRED = (("kind", str), ("job", str), ("round", int), ("device", str),
             ("codec", str), ("sha256", str), ("tensors", list), ("meta", dict))
_TENSOR_FIELDS = (("name", str), ("dtype", str), ("shape", list), ("offset", int),
                  ("nbytes", int), ("params", dict))
_HEX64 = re.compile(r"[0-9a-f]{64}")
_LITTLE = {d: np.dtype(d).newbyteorder("<") for d in DTYPES}


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


# --- encoding ---------------------------------------------------------------

def encode(frame: Frame, limits: Limits = Limits()) -> bytes:
    """The frame's bytes; refuses what ``decode(..., limits=limits)`` would refuse."""
    if not isinstance(frame.tensors, dict) or not isinstance(frame.params, dict):
        raise WireError(f"frame.tensors, frame.params: expected dicts, got "
                        f"{type(frame.tensors).__name__}, {type(frame.params).__name__}")
    for key in frame.params:
        if key not in frame.tensors:
            raise WireError(f"frame.params: expected keys among the tensor names, got "
                            f"{short(key)}")
    arrays = [_wire_array(name, value) for name, value in frame.tensors.items()]
    entries, offset = [], 0
    for name, arr in zip(frame.tensors, arrays):
        entries.append({"name": name, "dtype": arr.dtype.name, "shape": list(arr.shape),
                        "offset": offset, "nbytes": arr.nbytes,
                        "params": frame.params.get(name, {})})
        offset += arr.nbytes
    body = bytearray(offset)
    for arr, entry in zip(arrays, entries):
        if arr.size:  # assignment converts to the little-endian view's byte order
            np.frombuffer(body, arr.dtype.newbyteorder("<"), arr.size,
                          entry["offset"]).reshape(arr.shape)[...] = arr
    header = {"v": VERSION, "kind": frame.kind, "job": frame.job, "round": frame.round,
              "device": frame.device, "codec": frame.codec,
              "sha256": hashlib.sha256(body).hexdigest(), "tensors": entries,
              "meta": frame.meta}
    if frame.chunk is not None:
        header["chunk"] = frame.chunk
    check_json(header, "header", 1)
    _check_header(header, len(body), limits)
    # ASCII-only JSON: lone surrogates in a str cannot break the UTF-8 encoding.
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    max_header = min(limits.max_header, MAX_HEADER)
    if len(raw) > max_header:
        raise WireError(f"header length: expected at most {max_header} bytes, got {len(raw)} "
                        f"({len(entries)} tensors; move bulky params or meta into tensors)")
    return b"".join((MAGIC, struct.pack("<I", len(raw)), raw, body))


def _wire_array(name: object, value: object) -> np.ndarray:
    if not isinstance(name, str) or not name:
        raise WireError(f"tensor name: expected a non-empty string, got {short(name)}")
    arr = np.asarray(value)
    if arr.dtype.name not in DTYPES:
        raise WireError(f"tensor {name!r}.dtype: expected one of {', '.join(DTYPES)}, "
                        f"got {arr.dtype}")
    if arr.dtype.name in FLOAT_DTYPES:
        _check_finite(arr, name)
    return arr


# --- decoding ---------------------------------------------------------------

def decode(data: bytes | bytearray | memoryview, expect: Expect | None = None,
           limits: Limits = Limits()) -> Frame:
    """The frame in ``data``, checked in the order docs/protocol.md lists.

    ``data`` must not change during the call; the arrays returned are copies.
    """
    return _guarded(lambda: _decode(data, expect, limits))


def peek_header(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> dict:
    """The validated header, for routing; the body is neither hashed nor read."""
    return _guarded(lambda: _parse(_byte_view(data), limits)[0])


def _guarded(run: Callable[[], T]) -> T:
    try:
        return run()
    except WireError:
        raise
    except Exception as e:  # noqa: BLE001 - a malformed frame must never crash a receiver
        raise WireError(f"frame: undecodable ({type(e).__name__}: {e})") from e


def _decode(data: object, expect: Expect | None, limits: Limits) -> Frame:
    view = _byte_view(data)
    header, body = _parse(view, limits)
    digest = hashlib.sha256(body).hexdigest()
    if digest != header["sha256"]:
        raise WireError(f"header.sha256: expected the body's sha256 {digest[:16]}..., got "
                        f"{header['sha256'][:16]}...")
    if expect is not None:
        _check_expect(header, expect)
    tensors = {t["name"]: _array(body, t) for t in header["tensors"]}
    params = {t["name"]: t["params"] for t in header["tensors"]}
    return Frame(header["kind"], header["job"], header["round"], header["device"],
                 header["codec"], tensors, params, header["meta"], header.get("chunk"))


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
    body = view[PREFIX + h:]
    _check_header(header, len(body), limits)
    return header, body


def _check_header(header: object, body_len: int, limits: Limits) -> None:
    if not isinstance(header, dict):
        raise WireError(f"header: expected a JSON object, got {json_type(header)}")
    v = header.get("v")
    if not _is_int(v) or v not in SUPPORTED_VERSIONS:
        raise WireError(f"header.v: expected one of {SUPPORTED_VERSIONS}, got "
                        f"{_got(header, 'v')}")
    _fields(header, _REQUIRED, "header")
    for key in ("kind", "job", "device", "codec"):
        if not header[key]:
            raise WireError(f"header.{key}: expected a non-empty string, got ''")
    if not _HEX64.fullmatch(header["sha256"]):
        raise WireError(f"header.sha256: expected 64 lowercase hex digits, got "
                        f"{short(header['sha256'])}")
    if header["round"] < 0:
        raise WireError(f"header.round: expected >= 0, got {header['round']}")
    if "chunk" in header:
        _check_chunk(header["chunk"])
    tensors = header["tensors"]
    if len(tensors) > limits.max_tensors:
        raise WireError(f"header.tensors: expected at most {limits.max_tensors} entries, "
                        f"got {len(tensors)}")
    total = _check_tensors(tensors, limits)
    if total != body_len:
        raise WireError(f"body length: expected {total} bytes (the sum of tensor nbytes), "
                        f"got {body_len}")
    if body_len > limits.max_body:
        raise WireError(f"body length: expected at most {limits.max_body} bytes, "
                        f"got {body_len}")


def _check_chunk(chunk: object) -> None:
    where = "header.chunk"
    if not isinstance(chunk, dict):
        raise WireError(f"{where}: expected an object, got {json_type(chunk)}")
    _fields(chunk, (("id", str), ("index", int), ("count", int), ("sha256", str)), where)
    if not chunk["id"]:
        raise WireError(f"{where}.id: expected a non-empty string, got ''")
    if chunk["count"] < 1:
        raise WireError(f"{where}.count: expected >= 1, got {chunk['count']}")
    if not 0 <= chunk["index"] < chunk["count"]:
        raise WireError(f"{where}.index: expected 0 <= index < {chunk['count']}, "
                        f"got {chunk['index']}")
    if not _HEX64.fullmatch(chunk["sha256"]):
        raise WireError(f"{where}.sha256: expected 64 lowercase hex digits, got "
                        f"{short(chunk['sha256'])}")


def _check_tensors(tensors: list, limits: Limits) -> int:
    """Validate each tensor entry; returns the sum of their nbytes (Python ints: no overflow)."""
    seen: set[str] = set()
    offset = 0
    for i, t in enumerate(tensors):
        where = f"header.tensors[{i}]"
        if not isinstance(t, dict):
            raise WireError(f"{where}: expected an object, got {json_type(t)}")
        _fields(t, _TENSOR_FIELDS, where)
        name = t["name"]
        if not name or name in seen:
            raise WireError(f"{where}.name: expected a unique non-empty string, got "
                            f"{short(name)}{' again' if name else ''}")
        seen.add(name)
        where = f"tensor {short(name)}"
        if t["dtype"] not in DTYPES:
            raise WireError(f"{where}.dtype: expected one of {', '.join(DTYPES)}, "
                            f"got {short(t['dtype'])}")
        shape = t["shape"]
        if len(shape) > limits.max_ndim:
            raise WireError(f"{where}.shape: expected at most {limits.max_ndim} dimensions, "
                            f"got {len(shape)}")
        if not all(_is_int(d) and d >= 0 for d in shape):
            raise WireError(f"{where}.shape: expected non-negative integers, got "
                            f"{short(shape)}")
        itemsize = np.dtype(t["dtype"]).itemsize
        nbytes = math.prod(shape) * itemsize
        if t["nbytes"] != nbytes:
            raise WireError(f"{where}.nbytes: expected {nbytes} (shape {short(shape)} x "
                            f"{itemsize} bytes), got {t['nbytes']}")
        if t["offset"] != offset:
            raise WireError(f"{where}.offset: expected {offset} (right after the previous "
                            f"tensor), got {t['offset']}")
        offset += nbytes
    return offset


def _check_expect(header: dict, expect: Expect) -> None:
    for key in ("kind", "job", "round", "device", "codec"):
        want = expect.devices if key == "device" else getattr(expect, key)
        if want is None or (header[key] in want if key == "device" else header[key] == want):
            continue
        shown = f"a known device ({_names(sorted(want))})" if key == "device" else repr(want)
        raise WireError(f"header.{key}: expected {shown}, got {short(header[key])}")
    if expect.tensors is None:
        return
    got = [t["name"] for t in header["tensors"]]
    if set(got) != set(expect.tensors):
        missing = [n for n in expect.tensors if n not in set(got)]
        extra = [n for n in got if n not in expect.tensors]
        raise WireError(f"header.tensors: expected names [{_names(list(expect.tensors))}], "
                        f"got [{_names(got)}] (missing [{_names(missing)}], "
                        f"unexpected [{_names(extra)}])")
    for t in header["tensors"]:
        spec = expect.tensors[t["name"]]
        if t["dtype"] != spec.dtype:
            raise WireError(f"tensor {t['name']!r}.dtype: expected {spec.dtype}, "
                            f"got {t['dtype']}")
        # A None dimension is any length (a compressed stream; the codec checks it).
        if len(t["shape"]) != len(spec.shape) or any(
                s is not None and d != s for d, s in zip(t["shape"], spec.shape)):
            raise WireError(f"tensor {t['name']!r}.shape: expected {tuple(spec.shape)}, "
                            f"got {tuple(t['shape'])}")


def _array(body: memoryview, t: dict) -> np.ndarray:
    """A native-endian copy: independent of ``data`` (which a caller may reuse) and writable."""
    shape = tuple(t["shape"])
    view = np.frombuffer(body, _LITTLE[t["dtype"]], math.prod(shape), t["offset"]).reshape(shape)
    if t["dtype"] in FLOAT_DTYPES:
        _check_finite(view, t["name"])
    return view.astype(view.dtype.newbyteorder("="), copy=True)


def _check_finite(arr: np.ndarray, name: str) -> None:
    if np.isfinite(arr).all():
        return
    n_nan, n_inf = int(np.isnan(arr).sum()), int(np.isinf(arr).sum())
    first = int(np.flatnonzero(~np.isfinite(arr))[0])
    raise WireError(f"tensor {short(name)}: expected finite values, got {n_nan} NaN and "
                    f"{n_inf} Inf (first at flat index {first})")


# --- small helpers ----------------------------------------------------------

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _fields(obj: dict, fields: tuple, where: str) -> None:
    """Each (key, type) of ``fields`` present in ``obj`` with that JSON type."""
    for key, typ in fields:
        # JSON gives exact types (and True is a bool, not an int): the common case
        # costs one comparison, and ``_want`` words the error.
        if type(obj.get(key)) is not typ:
            _want(obj, key, typ, where)


def _want(obj: dict, key: str, typ: type, where: str) -> None:
    v = obj.get(key)
    if not (_is_int(v) if typ is int else isinstance(v, typ)):
        raise WireError(f"{where}.{key}: expected {JSON_NAMES[typ]}, got {_got(obj, key)}")


def _got(obj: dict, key: str) -> str:
    return f"{json_type(obj[key])} {short(obj[key])}" if key in obj else "nothing (missing)"


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(short(n, 40) for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def __getattr__(name: str) -> object:
    # chunking imports this module, so it is loaded on first use, not at import.
    if name in ("split", "Reassembler"):
        from device_runtime import chunking

        return getattr(chunking, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["MAGIC", "SUPPORTED_VERSIONS", "DTYPES", "MAX_HEADER", "Limits", "TensorSpec",
           "Expect", "Frame", "encode", "decode", "peek_header", "split", "Reassembler"]
