"""Folds: a round's aggregate built one update at a time, as the updates arrive.

The aggregator hands every accepted update to the round's fold, so a round
holds one running sum instead of N decoded models, and a codec with structure
(1-bit masks) is summed in its own form. ``add`` checks the whole payload
before it changes anything: a corrupt update raises WireError and leaves the
fold as it was.

- ``DecodeAll``: any strategy, any codec: decode, keep, call ``aggregate``.
- ``MeanFold``: FedAvg's sample-weighted mean; decodes into a float64 sum.
- ``FedMRNMean``: FedAvg over FedMRN masks: integer sums of the mask bits
  (``BitSum``), so the noise is regenerated once per round, not per update.

``mean_fold(codec, ctx)`` picks the mean fold registered for the codec's name
(``register_mean(name, factory)``), else ``MeanFold``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.base import Strategy, Update, Weights
from broker_server.strategies.bitsum import BitSum
from device_runtime.codecs import Codec, CodecContext
from device_runtime.codecs.fedmrn import FedMRNCodec, layout, noise, split_flat


class Fold(ABC):
    @abstractmethod
    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        """Fold one device's update (wire tensors and params, for the model ``variant``
        it trained) in, or raise WireError."""

    @abstractmethod
    def result(self) -> Weights:
        """The new global weights from everything added (at least one update)."""


class DecodeAll(Fold):
    """The general fold: decode each update, then ``strategy.aggregate`` on all of them."""

    def __init__(self, strategy: Strategy, round_: int, global_weights: Weights, codec: Codec,
                 ctx: CodecContext):
        self.strategy, self.round, self.weights = strategy, round_, global_weights
        self.codec, self.ctx = codec, ctx
        self.updates: dict[str, Update] = {}

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        w = self.codec.decode(tensors, params, self.ctx)
        self.updates[device] = Update(device, self.round, w, samples, {"variant": variant},
                                      raw=(tensors, params))

    def result(self) -> Weights:
        ordered = [self.updates[d] for d in sorted(self.updates)]
        return self.strategy.aggregate(self.round, self.weights, ordered)


class MeanFold(Fold):
    """Sum_k n_k * decode(update_k) / sum_k n_k, accumulated in float64."""

    def __init__(self, codec: Codec, ctx: CodecContext):
        self.codec, self.ctx, self.sum = codec, ctx, PartialSum()

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        self.sum.add(self.codec.decode(tensors, params, self.ctx), float(samples))

    def result(self) -> Weights:
        return self.sum.mean()


class FedMRNMean(Fold):
    """FedAvg of ``reference + noise * mask_k``: the noise is the round's, shared by all
    devices, so the mean is ``reference + noise * (sum_k n_k mask_k) / sum_k n_k``."""

    def __init__(self, codec: FedMRNCodec, ctx: CodecContext):
        if ctx.reference is None:
            raise ValueError("FedMRNMean needs the round's global model as reference")
        self.codec, self.ctx = codec, ctx
        self.shapes = {k: tuple(v.shape) for k, v in ctx.reference.items()}
        self.masked, self.dense, self.stats = layout(self.shapes)
        self.n_bits = sum(int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.masked)
        self.bits = BitSum((self.n_bits + 7) // 8)
        self.rest = PartialSum()  # the full-precision vectors

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        self.codec.check(tensors, params, self.ctx, self.shapes)
        self.bits.add(tensors["mask"], int(samples))
        self.rest.add({"dense": tensors["dense"], "stats": tensors["stats"]}, float(samples))

    def result(self) -> Weights:
        total = self.bits.total_weight
        frac = self.bits.counts(self.n_bits).astype(np.float32) * np.float32(1.0 / total)
        if self.codec.signed:  # m in {-1, +1}: E[m] = 2 * P(bit) - 1
            frac = 2 * frac - 1
        out, at, ref = {}, 0, self.ctx.reference
        for k in self.masked:
            n = noise(k, self.shapes[k], self.ctx.seed, self.codec.scale)
            out[k] = ref[k] + n * frac[at:at + n.size].reshape(n.shape)
            at += n.size
        rest = self.rest.sums
        for name, names in (("dense", self.dense), ("stats", self.stats)):
            out.update(split_flat(rest[name] / self.rest.weight, names, self.shapes))
        return {k: out[k].astype(np.float32, copy=False) for k in self.shapes}


MeanFactory = Callable[[Codec, CodecContext], Fold]
_MEANS: dict[str, MeanFactory] = {}


def register_mean(codec_name: str, factory: MeanFactory) -> MeanFactory:
    """Use ``factory`` for the weighted mean of updates sent with ``codec_name``."""
    _MEANS[codec_name] = factory
    return factory


def mean_fold(codec: Codec, ctx: CodecContext) -> Fold:
    return _MEANS.get(codec.name, MeanFold)(codec, ctx)


register_mean("fedmrn", FedMRNMean)
register_mean("fedmrn-signed", FedMRNMean)

__all__ = ["Fold", "DecodeAll", "MeanFold", "FedMRNMean", "mean_fold", "register_mean"]
