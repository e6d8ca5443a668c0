"""FedMRN: 1-bit masks over seeded random noise (Li et al., arXiv 2408.03220).

Conv and linear weights (every tensor of rank >= 2) travel as mask bits: the
update is ``noise * mask`` where the noise is regenerated on both ends from
the task's seed, so only the bits (and the seed) cross the uplink. BatchNorm
parameters and biases travel in full precision, as the paper does; BatchNorm
running statistics (not parameters) in float16. To keep the header small, all
masks go in one bit tensor and all dense values in two vectors, in the order of
the model's state dict, which both ends share. The device learns the mask with
``device_runtime.training.fedmrn``.

As a downlink code (``encode_change``, ``decode_change``) the change to send is a
FedMRN aggregate, ``noise * f``: ``fedmrn_change`` codes ``f`` in about one bit
per weight, entropy-coded.
"""
from __future__ import annotations

import threading
import zlib
from collections import OrderedDict

import numpy as np

from device_runtime.codecs import fedmrn_change as change
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
    """The same float32 noise on both ends: seeded by (seed, tensor name). Read-only: a
    round's noise is used again and again (training, coding the update, decoding the
    next round's change; on the server folding and coding the downlink; in a simulation
    by every device), so the recent ones are kept (``_NoiseCache``)."""
    return _CACHE.get((name, tuple(int(d) for d in shape), int(seed), float(scale)))


def _draw(name: str, shape: tuple[int, ...], seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(name.encode())])
    n = rng.random(size=shape, dtype=np.float32)  # float32 draws: half the cost of float64
    n *= 2
    n -= 1
    n *= np.float32(scale)  # uniform on [-scale, scale)
    n[n == 0] = 1e-8  # a zero would make the mask meaningless there
    n.flags.writeable = False
    return n


class _NoiseCache:
    """The noise of the ``seeds`` most recently used seeds (a round's and the round
    before's: a device decodes the change of the round before while it starts the
    next), at most ``limit`` bytes (a tensor larger than that is drawn each time).
    Drawing is 2.3 ns a weight; a simulated round of ten cnn-wide devices drew the
    same 1.4M weights 33 times. Bounded by seeds, not only by bytes: a job's memory
    must not grow round after round (tests/test_soak.py). One lock: a thread asking
    for a tensor being drawn waits for it instead of drawing it again."""

    def __init__(self, limit: int = 48 << 20, seeds: int = 2):
        self.limit, self.seeds, self.lock = limit, seeds, threading.Lock()
        self.items: OrderedDict[tuple, np.ndarray] = OrderedDict()

    def get(self, key: tuple) -> np.ndarray:
        with self.lock:
            hit = self.items.get(key)
            if hit is not None:
                self.items.move_to_end(key)
                return hit
            n = _draw(*key)
            if n.nbytes <= self.limit:
                self.items[key] = n
                self._evict()
            return n

    def _evict(self) -> None:
        recent = list(dict.fromkeys(k[2] for k in reversed(self.items)))[:self.seeds]
        for k in [k for k in self.items if k[2] not in recent]:
            del self.items[k]
        while sum(v.nbytes for v in self.items.values()) > self.limit:
            self.items.popitem(last=False)


_CACHE = _NoiseCache()


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


def _vectors(weights: Weights, dense: list[str], stats: list[str]) -> Weights:
    """The full-precision part of a payload: dense values as float32, statistics float16."""
    flat = lambda names, dt: (np.concatenate([weights[k].reshape(-1) for k in names])
                              .astype(dt) if names else np.zeros(0, dt))
    return {"dense": flat(dense, np.float32), "stats": flat(stats, np.float16)}


def _size(shapes: dict, names: list[str]) -> int:
    return int(sum(int(np.prod(shapes[k], dtype=np.int64)) for k in names))


class FedMRNCodec(Codec):
    name = "fedmrn"
    # As a downlink code (seeded like the round it sums): entropy-coded mask fractions.
    relative = True

    # The device trains masks, not weights: FedMRN's trainer, named by import path (it
    # imports this module, and torch, which a codec must not).
    trainer = "device_runtime.training.fedmrn:train_for_codec"

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
        tensors = {"mask": pack_bits(np.concatenate(bits) if bits else np.zeros(0, bool)),
                   **_vectors(weights, dense, stats)}
        return tensors, {"mask": self._params(ctx)}

    def _params(self, ctx: CodecContext) -> dict:
        return {"seed": int(ctx.seed), "scale": self.scale, "signed": self.signed}

    def encode_change(self, weights: Weights, ctx: CodecContext
                      ) -> tuple[Weights, dict[str, dict]]:
        """A FedMRN aggregate ``reference + noise * f`` as entropy-coded levels of f
        (``fedmrn_change``); BN, biases and statistics as ``encode`` sends them."""
        ref, fs, ws = self._reference(ctx), [], []
        mask, dense, stats = layout({k: v.shape for k, v in weights.items()})
        for k in mask:
            n = noise(k, weights[k].shape, ctx.seed, self.scale).reshape(-1)
            fs.append((weights[k].astype(np.float32) - ref[k]).reshape(-1) / n)
            ws.append(n.astype(np.float64) ** 2)  # error in weight space: noise² * error in f
        f = np.concatenate(fs) if fs else np.zeros(0, np.float32)
        data, levels = change.code(f, np.concatenate(ws) if ws else np.zeros(0))
        return ({"codes": np.frombuffer(data, np.uint8), **_vectors(weights, dense, stats)},
                {"codes": dict(self._params(ctx), levels=levels)})

    def decode_change(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext
                      ) -> Weights:
        ref = self._reference(ctx)
        shapes = {k: v.shape for k, v in ref.items()}
        mask, dense, stats = layout(shapes)
        p = params.get("codes") or {}
        self._check_params(p, ctx)
        levels = np.array(change.check_levels(p.get("levels")), np.float32)
        self._check_dense(tensors)
        sym = change.unpack(tensors["codes"].tobytes(), _size(shapes, mask), len(levels))
        out, at = {}, 0
        for k in mask:
            n = noise(k, shapes[k], ctx.seed, self.scale)
            out[k], at = ref[k] + n * levels[sym[at:at + n.size]].reshape(n.shape), at + n.size
        for names, vec in ((dense, tensors["dense"]), (stats, tensors["stats"])):
            out.update(split_flat(vec, names, shapes))
        return {k: out[k] for k in shapes}

    def change_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        spec = self.wire_spec(shapes)
        return {"codes": TensorSpec("uint8", (None,)), "dense": spec["dense"],
                "stats": spec["stats"]}

    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        ref = self._reference(ctx)
        shapes = {k: v.shape for k, v in ref.items()}
        mask, dense, stats = layout(shapes)
        self.check(tensors, params, ctx, shapes)
        bits = unpack_bits(tensors["mask"], _size(shapes, mask), "mask")
        out, at = {}, 0
        for k in mask:
            n = noise(k, shapes[k], ctx.seed, self.scale)
            m = bits[at:at + n.size].reshape(shapes[k]).astype(np.float32)
            if self.signed:
                m = 2 * m - 1
            out[k], at = ref[k] + n * m, at + n.size
        for names, vec in ((dense, tensors["dense"]), (stats, tensors["stats"])):
            out.update(split_flat(vec, names, shapes))
        return {k: out[k] for k in shapes}

    def check(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext,
              shapes: dict[str, tuple[int, ...]]) -> None:
        """WireError unless the payload is one this codec sent for ``ctx``: the mask's
        params, its padding bits, finite dense values (shapes: the wire decoder's)."""
        mask, _, _ = layout(shapes)
        self._check_params(params.get("mask") or {}, ctx, "mask")
        check_bits(tensors["mask"], _size(shapes, mask), "mask")
        self._check_dense(tensors)

    def _check_params(self, p: dict, ctx: CodecContext, name: str = "codes") -> None:
        if p.get("seed") != ctx.seed or p.get("scale") != self.scale or \
                p.get("signed", False) != self.signed:
            raise WireError(f"tensor {name} params: expected seed {ctx.seed}, scale "
                            f"{self.scale}, signed {self.signed}, got "
                            f"{ {k: p.get(k) for k in ('seed', 'scale', 'signed')}!r}")

    @staticmethod
    def _check_dense(tensors: Weights) -> None:
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
