"""Activation codecs for split training (EcoFed): ``act8`` and ``act4``.

A device that runs a frozen head sends the activations at the cut, which follow a
ReLU, so they are non-negative: unsigned codes with zero point 0 and one scale per
tensor, ``scale = max / (2^bits - 1)`` (docs/ALGORITHMS.md, section 2: the paper's
signed int8 wastes the sign bit). Rounding is to nearest: activations are not
averaged over devices, so an unbiased stochastic rounding buys nothing here.

- ``act8``: one uint8 per value, same shape as the activations.
- ``act4``: two values per byte, the first in the low nibble, flattened; an odd
  count leaves the last high nibble 0.

Only float tensors of activations are quantized; integer tensors (the labels that
travel beside them) pass through unchanged, with their dtype checked by the
receiver's expected spec. A negative or non-finite activation is refused at the
sender, and a payload whose codes or scale do not fit is refused at the receiver,
each with a reason.
"""
from __future__ import annotations

import numpy as np

from device_runtime.codecs.base import Codec, CodecContext, Weights
from device_runtime.codecs.fp16 import FLOAT32_MAX, read_scale
from device_runtime.errors import WireError
from device_runtime.wire import TensorSpec


def pack4(q: np.ndarray) -> np.ndarray:
    """uint8 codes 0..15 -> bytes holding two codes each (low nibble first)."""
    flat = q.ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.uint8)])
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack4(b: np.ndarray, n: int) -> np.ndarray:
    out = np.empty(b.size * 2, np.uint8)
    out[0::2], out[1::2] = b & 0x0F, b >> 4
    return out[:n]


class ActCodec(Codec):
    """Unsigned per-tensor quantization of non-negative activations to ``bits`` bits."""

    def __init__(self, bits: int, name: str):
        if bits not in (4, 8):
            raise ValueError(f"act codec bits: expected 4 or 8, got {bits}")
        self.bits, self.name, self.qmax = bits, name, (1 << bits) - 1

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        tensors, params = {}, {}
        for name, a in weights.items():
            a = np.asarray(a)
            if not np.issubdtype(a.dtype, np.floating):
                if a.dtype == np.uint8:  # uint8 means codes on the wire
                    raise WireError(f"tensor {name!r}: side data must not be uint8")
                tensors[name] = a  # labels and other integer side data
                continue
            a = a.astype(np.float32, copy=False)
            if a.size and not np.isfinite(a).all():
                raise WireError(f"tensor {name!r}: expected finite activations, got "
                                f"{int((~np.isfinite(a)).sum())} non-finite values")
            if a.size and float(a.min()) < 0:
                raise WireError(f"tensor {name!r}: {self.name} codes non-negative activations "
                                f"(after a ReLU), got a minimum of {float(a.min()):.3g}")
            peak = float(a.max()) if a.size else 0.0
            scale = np.float32(peak / self.qmax)
            q = np.zeros(a.shape, np.uint8) if scale == 0 else \
                np.clip(np.rint(a / scale), 0, self.qmax).astype(np.uint8)
            tensors[name] = q if self.bits == 8 else pack4(q)
            params[name] = {"scale": float(scale)}
            if self.bits == 4:  # packing flattens: the receiver needs the shape back
                params[name]["shape"] = list(a.shape)
        return tensors, params

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        out = {}
        for name, arr in tensors.items():
            if arr.dtype != np.uint8:  # integer side data (labels), checked by the wire spec
                out[name] = arr
                continue
            scale = read_scale(params.get(name, {}), name, FLOAT32_MAX / self.qmax)
            shape, q = tuple(arr.shape), arr
            if self.bits == 4:
                shape = _shape4(params.get(name, {}), name, arr.size)
                n = int(np.prod(shape, dtype=np.int64))
                q = unpack4(arr, n)
                if n % 2 and arr[-1] >> 4:
                    raise WireError(f"tensor {name!r}: expected the unused last nibble to be 0")
            if scale == 0 and q.any():
                raise WireError(f"tensor {name!r}: expected all zeros with params.scale 0, got "
                                f"{int(np.count_nonzero(q))} non-zero codes")
            out[name] = (q.astype(np.float32) * np.float32(scale)).reshape(shape)
        return out

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        """Activation shapes map to their codes; give labels as ``(dtype, shape)`` pairs."""
        spec = {}
        for name, shape in shapes.items():
            if isinstance(shape, TensorSpec):
                spec[name] = shape
            elif self.bits == 8:
                spec[name] = TensorSpec("uint8", tuple(shape))
            else:
                spec[name] = TensorSpec("uint8", ((int(np.prod(shape, dtype=np.int64)) + 1) // 2,))
        return spec


def _shape4(params: dict, name: str, packed: int) -> tuple[int, ...]:
    """``params["shape"]``: a list of ints whose product packs into ``packed`` bytes."""
    shape = params.get("shape")
    if not isinstance(shape, list) or any(isinstance(d, bool) or not isinstance(d, int) or
                                          d < 0 for d in shape):
        raise WireError(f"tensor {name!r}.params.shape: expected a list of non-negative ints, "
                        f"got {str(shape)[:40]!r}")
    n = int(np.prod(shape, dtype=np.int64))
    if (n + 1) // 2 != packed:
        raise WireError(f"tensor {name!r}.params.shape: {shape} needs {(n + 1) // 2} packed "
                        f"bytes, the payload has {packed}")
    return tuple(shape)


__all__ = ["ActCodec", "pack4", "unpack4"]
