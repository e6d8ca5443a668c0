"""The frame header's checks: every field, every length, and the receiver's expectations.

``device_runtime.wire`` parses a frame and calls these before it reads the body; they
raise ``WireError`` naming the field, the expected and the actual value (the order is
docs/protocol.md's). Version 2 headers carry ``auth`` (the signer's key id, the nonce
and the addressee), checked here; the signature itself is checked by ``wire``.
"""
from __future__ import annotations

import math
import re

import numpy as np

from device_runtime.errors import WireError
from device_runtime.strict_json import JSON_NAMES, json_type, short

SUPPORTED_VERSIONS = (1, 2)
SIGNED_VERSION = 2
DTYPES = ("float32", "float16", "int8", "uint8", "int16", "int32", "int64", "uint32")
# Fields every header carries, with their JSON type; "chunk" is optional, "auth" is
# required in a signed (version 2) header and absent otherwise.
_REQUIRED = (("kind", str), ("job", str), ("round", int), ("device", str),
             ("codec", str), ("sha256", str), ("tensors", list), ("meta", dict))
_TENSOR_FIELDS = (("name", str), ("dtype", str), ("shape", list), ("offset", int),
                  ("nbytes", int), ("params", dict))
_AUTH_FIELDS = (("key", str), ("nonce", str), ("to", str))
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
MAX_NONCE = 128
MAX_TO = 64


def check_header(header: object, body_len: int, limits) -> None:
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
    _check_auth(header, v)
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
    if "parts" in chunk:  # chunk 0's digests of the others (device_runtime/chunk_auth.py)
        parts = chunk["parts"]
        if chunk["index"] != 0 or not isinstance(parts, list) or \
                len(parts) != chunk["count"] - 1 or \
                not all(isinstance(d, str) and _HEX32.fullmatch(d) for d in parts):
            raise WireError(f"{where}.parts: expected, in chunk 0 only, {chunk['count'] - 1} "
                            f"digests of 32 lowercase hex digits, got {short(parts)} in "
                            f"chunk {chunk['index']}")


def _check_tensors(tensors: list, limits) -> int:
    """Validate each tensor entry; returns the sum of their nbytes (Python ints: no overflow)."""
    seen: set[str] = set()
    offset = 0
    for i, t in enumerate(tensors):
        # Error texts are built only for an error: this runs for every tensor of every
        # frame, on the aggregator and on each device.
        if not isinstance(t, dict):
            raise WireError(f"header.tensors[{i}]: expected an object, got {json_type(t)}")
        if not _typed(t):
            _fields(t, _TENSOR_FIELDS, f"header.tensors[{i}]")
        name = t["name"]
        if not name or name in seen:
            raise WireError(f"header.tensors[{i}].name: expected a unique non-empty string, "
                            f"got {short(name)}{' again' if name else ''}")
        seen.add(name)
        shape, dtype = t["shape"], t["dtype"]
        itemsize = _ITEMSIZE.get(dtype)
        if itemsize is not None and len(shape) <= limits.max_ndim and \
                all(type(d) is int and d >= 0 for d in shape):
            nbytes = math.prod(shape) * itemsize
            if t["nbytes"] == nbytes and t["offset"] == offset:
                offset += nbytes
                continue
        offset = _tensor_error(t, offset, limits)
    return offset


_ITEMSIZE = {d: np.dtype(d).itemsize for d in DTYPES}


def _typed(t: dict) -> bool:
    """Every field of a tensor entry there with its exact JSON type (the common case)."""
    # Written out: a generator over _TENSOR_FIELDS cost 5% of a device's CPU (every
    # tensor of every header, each time one is parsed or encoded).
    get = t.get
    return (type(get("name")) is str and type(get("dtype")) is str
            and type(get("shape")) is list and type(get("offset")) is int
            and type(get("nbytes")) is int and type(get("params")) is dict)


def _tensor_error(t: dict, offset: int, limits) -> int:
    """The slow check of tensor entry ``t`` (its fields typed, its name new), which words
    what is wrong; returns the offset after it if nothing is (an int subclass)."""
    where = f"tensor {short(t['name'])}"
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
    return offset + nbytes


def check_expect(header: dict, expect) -> None:
    for key in ("kind", "job", "round", "device", "codec"):
        want = expect.devices if key == "device" else getattr(expect, key)
        if want is None or (header[key] in want if key == "device" else header[key] == want):
            continue
        shown = f"a known device ({_names(sorted(want))})" if key == "device" else repr(want)
        raise WireError(f"header.{key}: expected {shown}, got {short(header[key])}")
    auth = header.get("auth", {})
    for key in ("nonce", "to"):
        want = getattr(expect, key)
        if want is not None and auth.get(key, "") != want:
            raise WireError(f"header.auth.{key}: expected {want!r}, got "
                            f"{short(auth.get(key, ''))}")
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


def _check_auth(header: dict, version: int) -> None:
    if version != SIGNED_VERSION:
        if "auth" in header:
            raise WireError(f"header.auth: expected none in a version {version} header "
                            "(only a signed frame carries it)")
        return
    auth = header.get("auth")
    if not isinstance(auth, dict):
        raise WireError(f"header.auth: expected an object in a signed (version 2) header, "
                        f"got {_got(header, 'auth')}")
    _fields(auth, _AUTH_FIELDS, "header.auth")
    if not _HEX16.fullmatch(auth["key"]):
        raise WireError(f"header.auth.key: expected 16 lowercase hex digits, got "
                        f"{short(auth['key'])}")
    for key, limit in (("nonce", MAX_NONCE), ("to", MAX_TO)):
        if len(auth[key]) > limit:
            raise WireError(f"header.auth.{key}: expected at most {limit} characters, got "
                            f"{len(auth[key])}")


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
