"""fp32: weights as they are (the uncompressed baseline)."""
from __future__ import annotations

import numpy as np

from device_runtime.codecs.base import Codec, CodecContext, Weights
from device_runtime.wire import TensorSpec


class Fp32Codec(Codec):
    name = "fp32"

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        return {k: np.require(v, np.float32, "C") for k, v in weights.items()}, {}  # keeps 0-d

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        return {k: v.astype(np.float32, copy=False) for k, v in tensors.items()}

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        return {k: TensorSpec("float32", tuple(s)) for k, s in shapes.items()}
