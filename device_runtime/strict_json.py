"""Strict JSON for untrusted messages: no duplicate keys, no NaN or Infinity,
bounded nesting, and short error texts that never echo a whole payload.

Used by the frame decoder (``wire``) for headers and by ``messages`` for the
JSON control messages.
"""
from __future__ import annotations

import json
import math

from device_runtime.errors import WireError

JSON_DEPTH = 64  # nesting; deeper would make every reader that recurses fragile
JSON_NAMES = {type(None): "null", bool: "boolean", int: "integer", float: "number",
               str: "string", list: "array", dict: "object"}


def check_json(value: object, where: str, depth: int) -> None:
    """Only plain JSON, nested no deeper than decode allows: json.dumps would quietly
    turn int keys into strings, and numpy scalars would fail deep inside it."""
    # Every frame's header passes here: a quick walk first, and the walk that words
    # the error (with the path to the bad value) only when there is one.
    if not _plain(value, depth):
        _check_json(value, where, depth)


_PLAIN = {str, bool, int, type(None)}


def _plain(value: object, depth: int) -> bool:
    """True if ``value`` is plain JSON as check_json wants it (no path kept)."""
    t = type(value)
    if t in _PLAIN:
        return True
    if t is float:
        return math.isfinite(value)
    if t is dict or t is list or t is tuple:
        if depth > JSON_DEPTH:
            return False
        if t is dict:
            return all(type(k) is str and _plain(v, depth + 1) for k, v in value.items())
        return all(_plain(v, depth + 1) for v in value)
    return False  # subclasses too: the wording walk decides what they are


def _check_json(value: object, where: str, depth: int) -> None:
    if isinstance(value, (list, tuple, dict)) and depth > JSON_DEPTH:
        raise WireError(f"{where}: expected JSON nested at most {JSON_DEPTH} deep, got deeper")
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise WireError(f"{where}: expected a finite number, got {value}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_json(v, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise WireError(f"{where}: expected string keys, got {short(k)}")
            _check_json(v, f"{where}.{k}", depth + 1)
    else:
        kind = f"{type(value).__module__}.{type(value).__qualname__}"
        raise WireError(f"{where}: expected a JSON value (dict, list, str, int, float, bool, "
                        f"None), got {kind}")


def load_json(raw: memoryview) -> object:
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as e:
        raise WireError(f"header: expected UTF-8, got an invalid byte at offset {e.start}") \
            from None
    try:
        header = _DECODER.decode(text)
    except RecursionError:
        raise WireError("header: expected JSON of sane nesting depth, got nesting deeper than "
                        "the parser's recursion limit") from None
    except ValueError as e:  # JSONDecodeError, and ints too long to convert
        raise WireError(f"header: expected a JSON object, got invalid JSON ({e})") from None
    depth = _nesting(header)
    if depth > JSON_DEPTH:
        raise WireError(f"header: expected JSON nested at most {JSON_DEPTH} deep, got {depth}")
    return header


def _nesting(value: object) -> int:
    """How deep lists and objects nest, counted a level at a time (no recursion)."""
    if type(value) is not dict and type(value) is not list:
        return 0
    depth, level = 0, [value]
    while level:
        depth += 1
        # json.loads builds exact dicts and lists; only containers nest.
        level = [c for v in level for c in (v.values() if type(v) is dict else v)
                 if type(c) is dict or type(c) is list]
    return depth


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    # Two "round" keys would let two readers disagree on what the frame says.
    out = dict(pairs)
    if len(out) != len(pairs):  # rare: find the key to name (the dict is built in C)
        seen: set[str] = set()
        for k, _ in pairs:
            if k in seen:
                raise WireError(f"header: expected unique keys, got {short(k)} twice")
            seen.add(k)
    return out


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # NaN, Infinity, and "1e999" which parses as inf
        raise WireError(f"header: expected finite JSON numbers, got {short(text)}")
    return value


# One decoder for every header: json.loads builds a new one (and its scanner) per call
# when given hooks (8.3 -> 6.8 us for a chunk's header).
_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_finite_float,
                            parse_float=_finite_float)


def json_type(v: object) -> str:
    return JSON_NAMES.get(type(v), type(v).__name__)


def short(v: object, limit: int = 60) -> str:
    # Frames come from anywhere: never echo 64 KiB of junk into a log line.
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + f"...({len(text)} chars)"
