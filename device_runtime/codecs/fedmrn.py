"""FedMRN: 1-bit masks over seeded random noise (Li et al., arXiv 2408.03220).

Conv and linear weights (every tensor of rank >= 2) travel as mask bits: the
update is ``noise * mask`` where the noise is regenerated on both ends from
the task's seed, so only the bits (and the seed) cross the uplink. BatchNorm
parameters and biases travel in full precision, as the paper does; BatchNorm
running statistics (not parameters) in float16. To keep the header small, all
masks go in one bit tensor and all dense values in two vectors, in the order of
the model's state dict, which both ends share. The device learns the mask with
``device_runtime.training.fedmrn``.

As a downlink code (``encode_change``) the change to send is a FedMRN aggregate,
``noise * f`` with ``f`` the devices' mask fraction. One bit per weight still
travels, but it is the better half of a two-level quantizer of ``f`` per tensor
(Lloyd-Max, weighted by the noise's square), and the two levels go in the params:
the plain majority (levels 0 and 1) moved weights whose fraction was 0.4 by 0
and those at 0.6 by the whole noise, which cost about 3 points on cnn-wide.
"""
from __future__ import annotations

import zlib

import numpy as np

from device_runtime.codecs.base import Codec, CodecContext, Weights, is_statistic
from device_runtime.codecs.bits import check_bits, pack_bits, packed_size, unpack_bits
from device_runtime.errors import WireError
from device_runtime.wire import TensorSpec

# Uniform noise U[-1, 1] * scale. The paper's default is 0.01 with mask lr 0.1 over 10
# local epochs; with fedge's 2 local epochs on MNIST-1D, 0.05 and 0.3 learned fastest
# (8-round sweep over 0.01..0.1 and 0.1..1.0; notes in docs/results/compression.md).
NOISE_SCALE = 0.05
MASK_LR = 0.3


def masked(shape: tuple[int, ...]) -> bool:
    """Conv and linear weights get masks; BN, biases and statistics do not."""
    return len(shape) >= 2


def noise(name: str, shape: tuple[int, ...], seed: int, scale: float = NOISE_SCALE
          ) -> np.ndarray:
    """The same float32 noise on both ends: seeded by (seed, tensor name)."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode())])
    n = rng.random(size=shape, dtype=np.float32)  # float32 draws: half the cost of float64
    n *= 2
    n -= 1
    n *= np.float32(scale)  # uniform on [-scale, scale)
    n[n == 0] = 1e-8  # a zero would make the mask meaningless there
    return n


def layout(shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str], list[str]]:
    """(masked, dense, stats) tensor names, in the order their values travel."""
    mask = [k for k, s in shapes.items() if masked(tuple(s))]
    stats = [k for k, s in shapes.items() if not masked(tuple(s)) and is_statistic(k)]
    dense = [k for k, s in shapes.items() if not masked(tuple(s)) and not is_statistic(k)]
    return mask, dense, stats


def split_flat(vec: np.ndarray, names: list[str], shapes: dict) -> Weights:
    """A flat "dense" or "stats" vector back into float32 tensors of ``names``."""
    out, at = {}, 0
    for k in names:
        size = int(np.prod(shapes[k], dtype=np.int64))
        out[k] = vec[at:at + size].astype(np.float32).reshape(shapes[k])
        at += size
    return out


def two_levels(f: np.ndarray, w: np.ndarray, lo: float, hi: float, steps: int = 4
               ) -> tuple[np.ndarray, float, float]:
    """(bits, lo, hi): the 1-bit quantizer of ``f`` with the least ``w``-weighted squared
    error (Lloyd iterations from levels ``lo``, ``hi``); levels are float32 values."""
    for _ in range(steps):
        bits = f > (lo + hi) / 2
        w1 = float(w[bits].sum())
        w0 = float(w.sum()) - w1
        # An empty side keeps its level: nothing is coded with it.
        hi = float(np.float32((w[bits] * f[bits]).sum() / w1)) if w1 > 0 else hi
        lo = float(np.float32((w[~bits] * f[~bits]).sum() / w0)) if w0 > 0 else lo
    return f > (lo + hi) / 2, lo, hi


def _size(shapes: dict, names: list[str]) -> int:
    return int(sum(int(np.prod(shapes[k], dtype=np.int64)) for k in names))


class FedMRNCodec(Codec):
    name = "fedmrn"
    trainer = "fedmrn"  # the device trains masks, not weights
    # As a downlink code (seeded like the round it sums): the majority of the masks.
    relative = True

    def __init__(self, scale: float = NOISE_SCALE, signed: bool = False, name: str = "fedmrn",
                 mask_lr: float = MASK_LR):
        # Signed masks (m in {-1, +1}) let every weight move either way along its noise.
        self.scale, self.signed, self.name, self.mask_lr = scale, signed, name, mask_lr

    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        ref = self._reference(ctx)
        mask, dense, stats = layout({k: v.shape for k, v in weights.items()})
        bits = []
        for k in mask:
            n = noise(k, weights[k].shape, ctx.seed, self.scale)
            delta = weights[k].astype(np.float32) - ref[k]
            # The trainer produced reference + noise * mask: recover the mask as
            # whichever of 0 and the noise the delta is closer to.
            zero = -n if self.signed else 0.0
            bits.append((np.abs(delta - n) < np.abs(delta - zero)).reshape(-1))
        flat = lambda names, dt: (np.concatenate([weights[k].reshape(-1) for k in names])
                                  .astype(dt) if names else np.zeros(0, dt))
        tensors = {"mask": pack_bits(np.concatenate(bits) if bits else np.zeros(0, bool)),
                   "dense": flat(dense, np.float32), "stats": flat(stats, np.float16)}
        return tensors, {"mask": {"seed": int(ctx.seed), "scale": self.scale,
                                  "signed": self.signed}}

    def encode_change(self, weights: Weights, ctx: CodecContext
                      ) -> tuple[Weights, dict[str, dict]]:
        """As ``encode``, for an aggregate: per masked tensor the two levels of the
        mask fraction that best code it, in params ``levels`` (module docstring)."""
        tensors, params = self.encode(weights, ctx)
        ref, bits, levels = self._reference(ctx), [], []
        for k in layout({k: v.shape for k, v in weights.items()})[0]:
            n = noise(k, weights[k].shape, ctx.seed, self.scale).reshape(-1)
            f = (weights[k].astype(np.float32) - ref[k]).reshape(-1) / n
            b, lo, hi = two_levels(f, n * n, *self._levels())
            bits.append(b)
            # The shortest decimal that is the same float32: a short header, exact levels.
            levels.append([float(str(np.float32(v))) for v in (lo, hi)])
        tensors["mask"] = pack_bits(np.concatenate(bits) if bits else np.zeros(0, bool))
        params["mask"]["levels"] = levels
        return tensors, params

    def _levels(self) -> tuple[float, float]:
        """The plain mask's two levels: what bit 0 and bit 1 multiply the noise by."""
        return (-1.0, 1.0) if self.signed else (0.0, 1.0)

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        ref = self._reference(ctx)
        shapes = {k: v.shape for k, v in ref.items()}
        mask, dense, stats = layout(shapes)
        self.check(tensors, params, ctx, shapes)
        bits = unpack_bits(tensors["mask"], _size(shapes, mask), "mask")
        levels = params["mask"].get("levels")
        out, at = {}, 0
        for i, k in enumerate(mask):
            n = noise(k, shapes[k], ctx.seed, self.scale)
            m = bits[at:at + n.size].reshape(shapes[k])
            if levels is None:
                m = m.astype(np.float32)
                if self.signed:
                    m = 2 * m - 1
            else:
                m = np.where(m, np.float32(levels[i][1]), np.float32(levels[i][0]))
            out[k], at = ref[k] + n * m, at + n.size
        for names, vec in ((dense, tensors["dense"]), (stats, tensors["stats"])):
            out.update(split_flat(vec, names, shapes))
        return {k: out[k] for k in shapes}

    def check(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext,
              shapes: dict[str, tuple[int, ...]]) -> None:
        """WireError unless the payload is one this codec sent for ``ctx``: the mask's
        params, its padding bits, finite dense values (shapes: the wire decoder's)."""
        mask, _, _ = layout(shapes)
        p = params.get("mask") or {}
        if p.get("seed") != ctx.seed or p.get("scale") != self.scale or \
                p.get("signed", False) != self.signed:
            raise WireError(f"tensor mask params: expected seed {ctx.seed}, scale "
                            f"{self.scale}, signed {self.signed}, got {p!r}")
        check_bits(tensors["mask"], _size(shapes, mask), "mask")
        levels = p.get("levels")
        if levels is not None and not (
                isinstance(levels, list) and len(levels) == len(mask) and all(
                    isinstance(v, list) and len(v) == 2 and all(
                        isinstance(x, (int, float)) and not isinstance(x, bool)
                        and np.isfinite(x) for x in v) for v in levels)):
            raise WireError(f"tensor mask params.levels: expected {len(mask)} pairs of "
                            f"finite numbers, got {str(levels)[:60]}")
        for name in ("dense", "stats"):
            if not np.isfinite(tensors[name]).all():
                raise WireError(f"fedmrn: tensor {name!r}: values must be finite")

    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        mask, dense, stats = layout(shapes)
        return {"mask": TensorSpec("uint8", (packed_size(_size(shapes, mask)),)),
                "dense": TensorSpec("float32", (_size(shapes, dense),)),
                "stats": TensorSpec("float16", (_size(shapes, stats),))}

    @staticmethod
    def _reference(ctx: CodecContext) -> Weights:
        if ctx.reference is None:
            raise WireError("fedmrn: needs the round's global model as reference")
        return ctx.reference
