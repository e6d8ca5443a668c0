"""A fold's running sums as wire tensors: what a scale-out worker sends, what the
coordinator merges (``Fold.partial`` / ``Fold.merge_partial``).

The wire format has no float64 or uint64 (a device never needs them), so the
exact bits travel reinterpreted: a float64 sum as pairs of little-endian uint32
words, bit planes (uint64 words) as their little-endian bytes. Nothing is
rounded on the way, so merged partials hold exactly the sums the workers had.
Every reader checks names, dtypes, sizes and finiteness and raises WireError
before anything is merged.
"""
from __future__ import annotations

import math

import numpy as np

from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.bitsum import BitSum
from device_runtime.codecs.base import Weights
from device_runtime.errors import WireError


def sums_out(ps: PartialSum, prefix: str) -> tuple[Weights, dict]:
    """``ps`` as tensors ``<prefix><name>`` (uint32 pairs) and meta ``{weight, count}``."""
    tensors = {prefix + k: np.ascontiguousarray(v, "<f8").reshape(-1).view("<u4")
               for k, v in ps.sums.items()}
    return tensors, {"weight": float(ps.weight), "count": int(ps.count)}


def sums_in(tensors: Weights, meta: object, prefix: str, shapes: dict) -> PartialSum:
    """The PartialSum that ``sums_out`` wrote, for tensors of ``shapes`` (all or none)."""
    if not isinstance(meta, dict) or not _number(meta.get("weight")) or \
            not isinstance(meta.get("count"), int) or meta["weight"] < 0 or meta["count"] < 0:
        raise WireError(f"partial meta {prefix!r}: expected {{weight >= 0, count >= 0}}, "
                        f"got {meta!r}")
    ps = PartialSum()
    names = {k[len(prefix):] for k in tensors if k.startswith(prefix)}
    if names and names != set(shapes):
        raise WireError(f"partial tensors {prefix}*: expected {sorted(shapes)}, "
                        f"got {sorted(names)}")
    if bool(names) != (meta["count"] > 0):
        raise WireError(f"partial tensors {prefix}*: {len(names)} for a count of "
                        f"{meta['count']}")
    for k in (shapes if names else ()):
        ps.sums[k] = _f64(tensors[prefix + k], prefix + k, shapes[k])
    ps.weight, ps.count = float(meta["weight"]), meta["count"]
    return ps


def bits_out(b: BitSum, name: str) -> tuple[Weights, dict]:
    """A BitSum's planes as one uint8 tensor (planes x bytes) and meta ``{total}``."""
    b.settle()
    planes = np.stack(b.planes) if b.planes else np.zeros((0, b.words), np.uint64)
    return {name: planes.astype("<u8").view(np.uint8)}, {"total": int(b.total_weight)}


def bits_in(tensors: Weights, meta: object, name: str, nbytes: int) -> BitSum:
    """The BitSum that ``bits_out`` wrote, over vectors of ``nbytes`` bytes."""
    total = meta.get("total") if isinstance(meta, dict) else None
    if not isinstance(total, int) or isinstance(total, bool) or total < 0:
        raise WireError(f"partial meta {name!r}: expected {{total: int >= 0}}, got {meta!r}")
    b = BitSum(nbytes)
    arr = tensors.get(name)
    want = (total.bit_length(), b.words * 8)  # BitSum keeps exactly that many planes
    if arr is None or arr.dtype != np.uint8 or arr.shape != want:
        got = None if arr is None else f"{arr.dtype}{list(arr.shape)}"
        raise WireError(f"partial tensor {name!r}: expected uint8{list(want)}, got {got}")
    words = np.ascontiguousarray(arr).view("<u8").astype(np.uint64)
    b.planes, b.total_weight = [row.copy() for row in words], total
    return b


def only(tensors: Weights, allowed: set[str]) -> None:
    """WireError if a partial holds a tensor outside ``allowed``."""
    extra = sorted(set(tensors) - allowed)
    if extra:
        raise WireError(f"partial tensors: expected among {sorted(allowed)}, got {extra}")


def _f64(arr: np.ndarray, name: str, shape: tuple) -> np.ndarray:
    size = math.prod(shape)
    if arr.dtype != np.uint32 or arr.shape != (2 * size,):
        raise WireError(f"partial tensor {name!r}: expected uint32[{2 * size}] (float64 "
                        f"pairs), got {arr.dtype}{list(arr.shape)}")
    out = np.ascontiguousarray(arr, "<u4").view("<f8").astype(np.float64).reshape(shape)
    if not np.isfinite(out).all():
        raise WireError(f"partial tensor {name!r}: values must be finite")
    return out


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


__all__ = ["sums_out", "sums_in", "bits_out", "bits_in", "only"]
