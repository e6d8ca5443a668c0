"""sign: one bit per weight, the sign of the update, plus one magnitude per tensor.

Wire: per weight one uint8 tensor of the same name and shape ``(ceil(n/8),)``,
``n`` the weight's element count (a 0-d weight counts 1): bit ``i`` (little bit
order, see ``bits.py``) is ``delta.flat[i] >= 0``, so a zero update reads as +1.
Params: ``{"scale": mean|delta| (float32), "shape": the weight's shape}``; the
shape is there so that a payload decodes without a reference and so that a bit
count that does not fit the shape is caught.

``decode`` returns ``reference + scale * (2 * bit - 1)``: the mean-magnitude
reconstruction, a usable FedAvg input. A signSGD / federated-voting strategy
wants the raw signs instead: ``signs_of`` gives them without any float math.
Updates are relative to ``ctx.reference`` (see ``fp16.RelativeCodec``).

BatchNorm running statistics are not trained, so they have no meaningful sign
step: they travel as float16 values (the device's own statistics, not a
delta; 2 bytes per channel), and the server averages them.
"""
from __future__ import annotations

import math

import numpy as np

from device_runtime.codecs.base import CodecContext, Weights, is_statistic
from device_runtime.codecs.bits import check_bits, pack_bits, packed_size
from device_runtime.codecs.fp16 import RelativeCodec, read_scale
from device_runtime.errors import WireError
from device_runtime.wire import Limits, TensorSpec

_MAX_NDIM = Limits().max_ndim  # the wire's own bound; numpy itself stops at 64
# With a zero dimension the bit count cannot bound the others; numpy refuses shapes
# whose extent (zeros aside) overflows, so refuse them first, with a reason.
_MAX_EXTENT = 2**48


class SignCodec(RelativeCodec):
    name = "sign"
    wire_dtype = "uint8"

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        stats = {k: v for k, v in weights.items() if is_statistic(k)}
        tensors, params = super().encode({k: v for k, v in weights.items() if k not in stats},
                                         ctx)
        for k, v in stats.items():
            if not np.isfinite(v).all():
                raise WireError(f"tensor {k!r}: expected finite statistics")
            tensors[k] = np.asarray(v, np.float16)
        return {k: tensors[k] for k in weights}, params

    def _decode_tensor(self, name: str, arr: np.ndarray, params: dict[str, dict],
                       ctx: CodecContext) -> np.ndarray:
        if not is_statistic(name):
            return super()._decode_tensor(name, arr, params, ctx)
        return statistic_of(name, arr)

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        return {k: TensorSpec("float16", tuple(s)) if is_statistic(k) else self._spec_one(tuple(s))
                for k, s in shapes.items()}

    def _encode_one(self, name: str, delta: np.ndarray, ctx: CodecContext
                    ) -> tuple[np.ndarray, dict]:
        scale = np.float32(np.abs(delta, dtype=np.float64).mean()) if delta.size else 0.0
        return pack_bits(delta >= 0), {"scale": float(scale), "shape": list(delta.shape)}

    def _decode_one(self, name: str, arr: np.ndarray, params: dict) -> np.ndarray:
        scale = read_scale(params, name)
        signs = _signs(name, arr, params)
        return np.asarray(signs.astype(np.float32) * scale, np.float32)

    def _spec_one(self, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec("uint8", (packed_size(math.prod(shape)),))


def statistic_of(name: str, arr: np.ndarray) -> np.ndarray:
    """A running statistic's float16 wire values as float32 (WireError unless finite)."""
    arr = np.asarray(arr)
    if arr.dtype != np.float16:
        raise WireError(f"tensor {name!r}.dtype: expected float16 (a statistic), got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise WireError(f"tensor {name!r}: expected finite statistics")
    return arr.astype(np.float32)


def check_payload(tensors: dict[str, np.ndarray], params: dict[str, dict],
                  shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """Check a sign frame against the weights' shapes without unpacking a bit: names,
    params, scales, shapes, padding bits and finite statistics. Returns the running
    statistics as float32.

    ``tensors`` / ``params`` are a sign frame's; ``shapes`` the weights' (from the
    plan). Raises WireError on a missing or extra tensor, a shape that disagrees,
    bad params or non-zero padding bits.
    """
    if set(tensors) != set(shapes):
        raise WireError(f"sign tensors: expected names {sorted(shapes)}, got {sorted(tensors)}")
    stats = {}
    for name, arr in tensors.items():
        if is_statistic(name):
            stats[name] = statistic_of(name, arr)
            continue
        p = params.get(name, {})
        if not isinstance(p, dict):
            raise WireError(f"tensor {name!r}.params: expected an object, got "
                            f"{type(p).__name__}")
        read_scale(p, name)  # a corrupt scale means a corrupt payload, even unused here
        shape = _checked_shape(name, np.asarray(arr), p)
        if shape != tuple(shapes[name]):
            raise WireError(f"tensor {name!r}.params.shape: expected {tuple(shapes[name])}, "
                            f"got {shape}")
    return stats


def signs_of(tensors: dict[str, np.ndarray], params: dict[str, dict],
             shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The update's signs per weight, int8 in {-1, +1} of the weight's shape (0 -> +1),
    after ``check_payload``; running statistics (values, not signs) are left out."""
    check_payload(tensors, params, shapes)
    return {name: _signs(name, np.asarray(arr), params[name]) for name, arr in tensors.items()
            if not is_statistic(name)}


def _signs(name: str, arr: np.ndarray, params: dict) -> np.ndarray:
    """int8 +-1 of the shape in params, after checking the bits fit that shape exactly."""
    shape = _checked_shape(name, arr, params)
    bits = np.unpackbits(arr, count=math.prod(shape), bitorder="little")
    return np.where(bits, np.int8(1), np.int8(-1)).reshape(shape)


def _checked_shape(name: str, arr: np.ndarray, params: dict) -> tuple[int, ...]:
    """The shape in params, once the packed bits are checked to fit it exactly."""
    shape = _read_shape(params, name)
    n = math.prod(shape)
    if arr.dtype != np.uint8 or arr.ndim != 1 or arr.size != packed_size(n):
        raise WireError(f"tensor {name!r}: expected uint8 of shape ({packed_size(n)},) for "
                        f"params.shape {list(shape)} ({n} bits), got {arr.dtype} of shape "
                        f"{arr.shape}")
    check_bits(arr, n, name)
    return shape


def _read_shape(params: dict, name: str) -> tuple[int, ...]:
    shape = params.get("shape")
    if not isinstance(shape, list) or len(shape) > _MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise WireError(f"tensor {name!r}.params.shape: expected a list of at most {_MAX_NDIM} "
                        f"non-negative integers, got {str(shape)[:60]}"
                        f"{' (missing)' if 'shape' not in params else ''}")
    if math.prod(max(d, 1) for d in shape) > _MAX_EXTENT:
        raise WireError(f"tensor {name!r}.params.shape: expected at most {_MAX_EXTENT} "
                        f"elements ignoring zero dimensions, got {str(shape)[:60]}")
    return tuple(shape)


__all__ = ["SignCodec", "check_payload", "signs_of", "statistic_of"]
