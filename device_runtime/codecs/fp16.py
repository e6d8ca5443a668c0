"""fp16: the update as float16, and the reference-relative template the lossy codecs share.

Every lossy codec here (fp16, int8, sign) codes the UPDATE ``w - reference``
when ``ctx.reference`` (the global model both ends hold this round) is given,
and decoding returns ``reference + decoded update``: the update is small and
centred on zero, so its error is small relative to the weights and quantizing
it costs far less accuracy than quantizing the weights. Without a reference
(``ctx.reference is None``) the weights themselves are coded, and decode returns
them.

``RelativeCodec`` is that template: a subclass codes one tensor at a time
(``_encode_one`` / ``_decode_one`` / ``_spec_one``), wire tensors keep the weight
names, and the template checks names, shapes, dtypes and finiteness. It lives
here because fp16 is the plainest relative codec; it would sit as well in
``base.py``.
"""
from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np

from device_runtime.codecs.base import Codec, CodecContext, Weights
from device_runtime.errors import WireError
from device_runtime.wire import TensorSpec

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT16_MAX = float(np.finfo(np.float16).max)


class RelativeCodec(Codec):
    """Codes ``w - reference`` per tensor (``w`` itself when there is no reference)."""

    wire_dtype: str = ""
    relative = True  # codes ``w - ctx.reference``: usable for the coded downlink

    @abstractmethod
    def _encode_one(self, name: str, delta: np.ndarray, ctx: CodecContext
                    ) -> tuple[np.ndarray, dict]:
        """The wire array and JSON params for one float32 update (finite, any shape)."""

    @abstractmethod
    def _decode_one(self, name: str, arr: np.ndarray, params: dict) -> np.ndarray:
        """The float32 update back from one wire array (dtype already checked)."""

    @abstractmethod
    def _spec_one(self, shape: tuple[int, ...]) -> TensorSpec:
        """The wire tensor for a weight of this shape."""

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        tensors, params = {}, {}
        for name, w in weights.items():
            w = np.require(w, np.float32, "C")  # keeps 0-d (ascontiguousarray would not)
            delta = w if ctx.reference is None else w - _reference(ctx.reference, name, w.shape)
            delta = np.asarray(delta, np.float32)  # 0-d minus 0-d is a numpy scalar
            if not np.isfinite(delta).all():
                raise WireError(f"tensor {name!r}: expected finite weights and reference, got "
                                f"{int((~np.isfinite(delta)).sum())} non-finite update values")
            tensors[name], p = self._encode_one(name, delta, ctx)
            if p:
                params[name] = p
        return tensors, params

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        try:
            with np.errstate(all="ignore"):  # overflow is caught below, not by a warning
                return {name: self._decode_tensor(name, arr, params, ctx)
                        for name, arr in tensors.items()}
        except WireError:
            raise
        except Exception as e:  # noqa: BLE001 - a malformed payload must not crash a receiver
            raise WireError(f"codec {self.name}: undecodable payload "
                            f"({type(e).__name__}: {e})") from e

    def _decode_tensor(self, name: str, arr: np.ndarray, params: dict[str, dict],
                       ctx: CodecContext) -> np.ndarray:
        p = params.get(name, {}) if isinstance(params, dict) else None
        if not isinstance(p, dict):
            raise WireError(f"tensor {name!r}.params: expected an object, got "
                            f"{type(p).__name__}")
        arr = np.asarray(arr)
        if arr.dtype != np.dtype(self.wire_dtype):
            raise WireError(f"tensor {name!r}.dtype: expected {self.wire_dtype}, got {arr.dtype}")
        delta = self._decode_one(name, arr, p)
        if ctx.reference is None:
            out = delta
        else:
            out = _reference(ctx.reference, name, delta.shape) + delta
        out = np.asarray(out, np.float32)
        if not np.isfinite(out).all():
            raise WireError(f"tensor {name!r}: expected finite decoded weights, got "
                            f"{int((~np.isfinite(out)).sum())} non-finite values "
                            f"(a scale or update too large for float32)")
        return out

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        return {name: self._spec_one(tuple(shape)) for name, shape in shapes.items()}


def _reference(reference: Weights, name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in reference:
        raise WireError(f"tensor {name!r}: expected a name of the reference model, got one "
                        f"it does not have")
    ref = np.asarray(reference[name], np.float32)
    if ref.shape != tuple(shape):
        raise WireError(f"tensor {name!r}.shape: expected {ref.shape} (the reference's), "
                        f"got {tuple(shape)}")
    return ref


def read_scale(params: dict, name: str, limit: float = FLOAT32_MAX) -> np.float32:
    """``params["scale"]``: a JSON number, finite, 0 <= scale <= limit, as float32."""
    if "scale" not in params:
        raise WireError(f"tensor {name!r}.params.scale: expected a number, got nothing "
                        f"(missing)")
    s = params["scale"]
    if isinstance(s, bool) or not isinstance(s, (int, float)):
        raise WireError(f"tensor {name!r}.params.scale: expected a number, got "
                        f"{type(s).__name__} {str(s)[:40]!r}")
    try:
        s = float(s)
    except OverflowError:  # JSON integers are unbounded
        s = math.inf
    if not (math.isfinite(s) and 0.0 <= s <= limit):
        raise WireError(f"tensor {name!r}.params.scale: expected a finite number in "
                        f"[0, {limit:.6g}], got {s!r}")
    return np.float32(s)


class Fp16Codec(RelativeCodec):
    """The update as float16, same shape; no params. Near-exact (11-bit mantissa)."""

    name = "fp16"
    wire_dtype = "float16"

    def _encode_one(self, name: str, delta: np.ndarray, ctx: CodecContext
                    ) -> tuple[np.ndarray, dict]:
        peak = float(np.abs(delta).max()) if delta.size else 0.0
        if peak > FLOAT16_MAX:  # a cast would quietly make it inf
            raise WireError(f"tensor {name!r}: update of magnitude {peak:.6g} exceeds float16's "
                            f"range ({FLOAT16_MAX:g}); use the fp32 codec")
        return delta.astype(np.float16), {}

    def _decode_one(self, name: str, arr: np.ndarray, params: dict) -> np.ndarray:
        return arr.astype(np.float32)

    def _spec_one(self, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec("float16", shape)


__all__ = ["Fp16Codec", "RelativeCodec", "read_scale"]
