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

Scale-out (``broker_server/workers.py``): a fold that can be split over workers
has ``splittable`` True, ``partial()`` (its sums as wire tensors and JSON, see
``partials.py``) and ``merge_partial()``, which adds a worker's partial or
raises WireError having changed nothing.

``mean_fold(codec, ctx)`` picks the mean fold registered for the codec's name
(``register_mean(name, factory)``), else ``MeanFold``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable

import numpy as np

from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.bitsum import BitSum
from broker_server.strategies.exchange import Update
from broker_server.strategies.partials import bits_in, bits_out, only, sums_in, sums_out
from device_runtime.codecs import Codec, CodecContext
from device_runtime.codecs.base import Weights
from device_runtime.codecs.fedmrn import FedMRNCodec, layout, noise, split_flat

if TYPE_CHECKING:  # the interface returns folds; a fold only holds its strategy
    from broker_server.strategies.base import Strategy


class Fold(ABC):
    @abstractmethod
    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        """Fold one device's update (wire tensors and params, for the model ``variant``
        it trained) in, or raise WireError."""

    @abstractmethod
    def result(self) -> Weights:
        """The new global weights from everything added (at least one update)."""

    @property
    def splittable(self) -> bool:
        """Whether ``partial`` and ``merge_partial`` work (scale-out workers)."""
        return False

    def record(self) -> dict:
        """Entries for the round log once ``result`` ran (e.g. the robust step's)."""
        return {}

    def partial(self) -> tuple[Weights, dict]:
        """This fold's sums as wire tensors and JSON, for the coordinator to merge."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split over workers")

    def merge_partial(self, tensors: Weights, meta: dict) -> None:
        """Add another fold's ``partial()``; WireError (and no change) if it does not fit."""
        raise NotImplementedError(f"{type(self).__name__} cannot be split over workers")


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

    @property
    def splittable(self) -> bool:
        return self.ctx.reference is not None  # the sums' shapes, to check a partial

    def partial(self) -> tuple[Weights, dict]:
        tensors, meta = sums_out(self.sum, "sum.")
        return tensors, {"sum": meta}

    def merge_partial(self, tensors: Weights, meta: dict) -> None:
        shapes = {k: tuple(v.shape) for k, v in self.ctx.reference.items()}
        only(tensors, {"sum." + k for k in shapes})
        self.sum.merge(sums_in(tensors, meta.get("sum"), "sum.", shapes))


class FedMRNMean(Fold):
    """FedAvg of ``reference + noise * mask_k``: the noise is the round's, shared by all
    devices, so the mean is ``reference + noise * (sum_k n_k mask_k) / sum_k n_k``.

    ``share_cap`` > 0: each device's sample weight is cut to at most that share of the
    round's total (``robust.votes.cap_shares``, whole samples), so that no device moves a
    weight by more than share_cap x |noise|; the total is known at the close, so the fold
    then holds each update's mask bits and dense vectors until ``result``."""

    def __init__(self, codec: FedMRNCodec, ctx: CodecContext, share_cap: float = 0.0):
        if ctx.reference is None:
            raise ValueError("FedMRNMean needs the round's global model as reference")
        self.codec, self.ctx = codec, ctx
        self.shapes = {k: tuple(v.shape) for k, v in ctx.reference.items()}
        self.masked, self.dense, self.stats = layout(self.shapes)
        self.n_bits = sum(int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.masked)
        self.bits = BitSum((self.n_bits + 7) // 8)
        self.rest = PartialSum()  # the full-precision vectors
        self.cap, self.held = share_cap, {}

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        self.codec.check(tensors, params, self.ctx, self.shapes)
        if self.cap:
            self.held[device] = (tensors, int(samples))
            return
        self._add(tensors, int(samples))

    def _add(self, tensors: Weights, samples: int) -> None:
        self.bits.add(tensors["mask"], samples)
        self.rest.add({"dense": tensors["dense"], "stats": tensors["stats"]}, float(samples))

    def result(self) -> Weights:
        if self.held:
            from broker_server.robust.votes import cap_shares

            devices = sorted(self.held)
            counts = np.array([self.held[d][1] for d in devices], np.float64)
            capped = cap_shares(counts, max(self.cap, 1.0 / len(devices)), steps=1)
            for d, w in zip(devices, capped):
                self._add(self.held[d][0], max(int(w), 1))
            self.held = {}
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

    @property
    def splittable(self) -> bool:
        return not self.cap  # a share needs the whole round's total

    def partial(self) -> tuple[Weights, dict]:
        bits, bits_meta = bits_out(self.bits, "bits")
        rest, rest_meta = sums_out(self.rest, "rest.")
        return {**bits, **rest}, {"bits": bits_meta, "rest": rest_meta}

    def merge_partial(self, tensors: Weights, meta: dict) -> None:
        size = lambda names: (sum(int(np.prod(self.shapes[k], dtype=np.int64)) for k in names),)
        only(tensors, {"bits", "rest.dense", "rest.stats"})
        bits = bits_in(tensors, meta.get("bits"), "bits", self.bits.nbytes)
        rest = sums_in(tensors, meta.get("rest"), "rest.",
                       {"dense": size(self.dense), "stats": size(self.stats)})
        self.bits.merge(bits)  # both read and checked: the merge cannot fail half-way
        self.rest.merge(rest)


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
