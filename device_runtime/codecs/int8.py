"""int8: the update with a per-tensor symmetric scale and stochastic rounding (unbiased).

Wire: one int8 tensor per weight, same name and shape, values in [-127, 127]
(-128 is reserved: a symmetric range keeps zero exact and the error even, so a
-128 on the wire means corruption); params ``{"scale": s}``, a JSON number, with
``s = max|delta| / 127`` rounded UP to float32 so that ``|delta| / s <= 127``.
``s == 0`` exactly when the update is all zeros, and then every value is 0.

Rounding: ``q = floor(delta / s + u)``, ``u ~ U[0, 1)``, so
``E[q * s] = delta`` (unbiased: averaging many devices' updates averages the
rounding error away) and the single-shot error is below ``s``. ``u`` comes from
``np.random.default_rng`` seeded by (ctx.seed, ctx.round, tensor name): the
device's own randomness, reproducible for tests; the server never needs it.
Updates are relative to ``ctx.reference`` (see ``fp16.RelativeCodec``).
"""
from __future__ import annotations

import hashlib

import numpy as np

from device_runtime.codecs.base import CodecContext
from device_runtime.codecs.fp16 import FLOAT32_MAX, RelativeCodec, read_scale
from device_runtime.errors import WireError
from device_runtime.wire import TensorSpec

QMAX = 127
# Keeps this stream apart from other codecs' (e.g. FedMRN noise) drawn from the same seed.
_STREAM = 0x1A78


def rounding_rng(seed: int, round_: int, name: str) -> np.random.Generator:
    """The generator for one tensor's rounding noise (stable across processes and runs)."""
    name_key = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8],
                              "little")
    return np.random.default_rng([_STREAM, seed % 2**64, round_ % 2**64, name_key])


def scale_for(delta: np.ndarray) -> np.float32:
    """max|delta| / 127 as float32, rounded up so that no |delta| / scale exceeds 127."""
    peak = float(np.abs(delta).max()) if delta.size else 0.0
    s = np.float32(peak / QMAX)
    if float(s) * QMAX < peak:  # exact in float64: 24-bit mantissa x 7-bit integer
        s = np.nextafter(s, np.float32(np.inf))
    return s


class Int8Codec(RelativeCodec):
    name = "int8"
    wire_dtype = "int8"

    def _encode_one(self, name: str, delta: np.ndarray, ctx: CodecContext
                    ) -> tuple[np.ndarray, dict]:
        s = scale_for(delta)
        if s == 0:
            return np.zeros(delta.shape, np.int8), {"scale": 0.0}
        u = rounding_rng(ctx.seed, ctx.round, f"{ctx.device}/{name}").random(delta.shape)
        q = np.floor(delta.astype(np.float64) / float(s) + u)
        # A no-op by construction of s; kept so that no float surprise can wrap an int8.
        q = np.clip(q, -QMAX, QMAX).astype(np.int8)
        return q, {"scale": float(s)}  # float(float32) is exact and JSON round-trips it

    def _decode_one(self, name: str, arr: np.ndarray, params: dict) -> np.ndarray:
        s = read_scale(params, name, FLOAT32_MAX / QMAX)  # so that 127 * s stays finite
        if arr.size:
            low = int(arr.min())
            if low < -QMAX:
                raise WireError(f"tensor {name!r}: expected values in [-{QMAX}, {QMAX}], got "
                                f"{low} (-128 is reserved)")
            if s == 0 and arr.any():
                raise WireError(f"tensor {name!r}: expected all zeros with params.scale 0, got "
                                f"{int(np.count_nonzero(arr))} non-zero values")
        return np.asarray(arr.astype(np.float32) * s, np.float32)

    def _spec_one(self, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec("int8", shape)


__all__ = ["Int8Codec", "rounding_rng", "scale_for", "QMAX"]
