"""FedMRN: 1-bit masks over seeded random noise (Li et al., arXiv 2408.03220).

Conv and linear weights (every tensor of rank >= 2) travel as ``mask`` bits: the
update is ``noise * mask`` where the noise is regenerated on both ends from
the task's seed, so only the bits (and the seed) cross the uplink. BatchNorm
parameters, biases and statistics travel in full precision, as the paper does.
The device learns the mask with ``device_runtime.training.fedmrn``.
"""
from __future__ import annotations

import zlib

import numpy as np

from device_runtime.codecs.base import Codec, CodecContext, Weights
from device_runtime.codecs.bits import pack_bits, packed_size, unpack_bits
from device_runtime.errors import WireError
from device_runtime.wire import TensorSpec

NOISE_SCALE = 0.01  # uniform noise U[-1, 1] * scale: the paper's default


def masked(shape: tuple[int, ...]) -> bool:
    """Conv and linear weights get masks; BN, biases and statistics do not."""
    return len(shape) >= 2


def noise(name: str, shape: tuple[int, ...], seed: int, scale: float = NOISE_SCALE
          ) -> np.ndarray:
    """The same float32 noise on both ends: seeded by (seed, tensor name)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode())])
    n = (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(np.float32)
    n[n == 0] = 1e-8  # a zero would make the mask meaningless there
    return n


class FedMRNCodec(Codec):
    name = "fedmrn"
    trainer = "fedmrn"  # the device trains masks, not weights

    def __init__(self, scale: float = NOISE_SCALE):
        self.scale = scale

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        if ctx.reference is None:
            raise WireError("fedmrn: needs the round's global model as reference")
        out, params = {}, {}
        for k, w in weights.items():
            if masked(w.shape):
                n = noise(k, w.shape, ctx.seed, self.scale)
                delta = w.astype(np.float32) - ctx.reference[k]
                # The trainer produced reference + noise * mask: recover the mask as
                # whichever of 0 and noise the delta is closer to.
                bits = np.abs(delta - n) < np.abs(delta)
                out[f"{k}.mask"] = pack_bits(bits)
                params[f"{k}.mask"] = {"seed": int(ctx.seed), "scale": self.scale}
            else:
                out[k] = np.require(w, np.float32, "C")
        return out, params

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        if ctx.reference is None:
            raise WireError("fedmrn: needs the round's global model as reference")
        out = {}
        for k, ref in ctx.reference.items():
            if masked(ref.shape):
                p = params.get(f"{k}.mask") or {}
                if p.get("seed") != ctx.seed or p.get("scale") != self.scale:
                    raise WireError(f"tensor {k}.mask params: expected seed {ctx.seed} and "
                                    f"scale {self.scale}, got {p!r}")
                bits = unpack_bits(tensors[f"{k}.mask"], ref.size, f"{k}.mask")
                n = noise(k, ref.shape, ctx.seed, self.scale)
                out[k] = ref + n * bits.reshape(ref.shape).astype(np.float32)
            else:
                out[k] = tensors[k].astype(np.float32, copy=False)
        return out

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        spec = {}
        for k, s in shapes.items():
            if masked(s):
                spec[f"{k}.mask"] = TensorSpec("uint8", (packed_size(int(np.prod(s))),))
            else:
                spec[k] = TensorSpec("float32", tuple(s))
        return spec
