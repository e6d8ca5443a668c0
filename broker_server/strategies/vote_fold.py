"""The signSGD vote folded straight from the sign bits (majority or federated voting).

Each update's sign bits (all tensors' packed bytes, one after another) go into
one ``BitSum`` with the device's integer voting weight ``WEIGHT_STEPS * w`` (w = 1 for
a majority vote and in federated voting's warm-up); a negative weight adds the
complemented bits, since ``-w * s = |w| * (-s)``. The vote is then
``sign(2 * count - sum |w|)`` per coordinate, the same decision as
``voting.weighted_vote`` on the unpacked signs, without unpacking any update.
For federated voting, each device's agreement with the reference vote (the
others', leave-one-out, or the full one: ``SignSGDOptions.reference``) is measured
on a systematic sample of the round's coordinates
(``SignSGDOptions.agreement_sample``, all of them in a smaller model): p_m is a
probability, and 2,048 coordinates estimate it to about +-0.011 per round, +-0.0011
over the ~100 rounds the discounted counters average (a weight error of about
0.005), while exact leave-one-out counts over 10M coordinates cost more than the
vote, and 8,192 coordinates cost 2 ms a round at 100 devices.
Running statistics arrive as float16 values and are averaged by samples.
With a vote cap (``SignSGDOptions.vote_cap``, FV past warm-up) a device's share
needs the round's total weight, known only when the round closes: the fold then
holds each update's packed bits until ``result`` (n x params / 8 bytes: 20 devices
x 1M parameters, 2.5 MB) and adds them with the capped weights.
"""
from __future__ import annotations

import math

import numpy as np

from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.base import Weights
from broker_server.strategies.bitsum import BitSum
from broker_server.strategies.folds import Fold
from broker_server.strategies.partials import bits_in, bits_out, only, sums_in, sums_out
from broker_server.strategies.voting import (WEIGHT_STEPS, pairwise_reliability,
                                             sample_positions, sampled_agreement)
from device_runtime.codecs.base import is_statistic
from device_runtime.codecs.bits import packed_size
from device_runtime.codecs.sign import check_payload


class VoteFold(Fold):
    def __init__(self, strategy, round_: int, global_weights: Weights):
        self.strategy, self.weights, self.round = strategy, global_weights, round_
        self.all_shapes = {k: tuple(v.shape) for k, v in global_weights.items()}
        self.shapes = {k: s for k, s in self.all_shapes.items() if not is_statistic(k)}
        self.stat_names = [k for k in global_weights if is_statistic(k)]
        self.stats = PartialSum()
        self.sizes = {k: math.prod(s) for k, s in self.shapes.items()}
        self.offsets, at = {}, 0
        for k in self.shapes:
            self.offsets[k], at = at, at + packed_size(self.sizes[k])
        self.bits = BitSum(at)
        self.weighted = strategy.weighted(round_)
        self.records = strategy.opts.decoder == "fv"  # a majority vote never reads counters
        if self.records:  # byte and bit of each sampled coordinate, found once a round
            self.where = self._sample(round_)
            self.where_byte, self.where_bit = self.where >> 3, (self.where & 7).astype(np.uint8)
        self.sampled: dict[str, np.ndarray] = {}  # device -> its bytes at ``where``
        self.q: dict[str, int] = {}
        self.held: dict[str, tuple[np.ndarray, float]] = {}  # capped: (bits, weight)
        self.cap = strategy.opts.vote_cap if self.weighted else 0.0

    def _sample(self, round_: int) -> np.ndarray:
        """Bit positions (in the concatenated packed vector) where agreement is measured."""
        n = sum(self.sizes.values())
        k = self.strategy.opts.agreement_sample
        flat = sample_positions(n, k, round_)
        starts = np.cumsum([0] + list(self.sizes.values()))
        bases = np.array([self.offsets[t] * 8 for t in self.shapes], np.int64)
        tensor = np.searchsorted(starts, flat, side="right") - 1
        return bases[tensor] + (flat - starts[tensor])

    def add(self, device: str, samples: int, tensors: Weights, params: dict,
            variant: str = "full") -> None:
        stats = check_payload(tensors, params, self.all_shapes)
        vec = np.concatenate([tensors[k] for k in self.shapes])
        w = self.strategy.votes.weight(device) if self.weighted else 1.0
        if self.records:
            self.sampled[device] = vec[self.where_byte]  # bytes; bits taken in result
        self.stats.add(stats, float(samples))
        if self.cap:
            self.held[device] = (vec, w)
            return
        self._vote(device, vec, w)

    def _vote(self, device: str, vec: np.ndarray, w: float) -> None:
        q = int(round(w * WEIGHT_STEPS))
        self.bits.add(vec, abs(q), invert=q < 0)
        self.q[device] = q

    def result(self) -> Weights:
        if self.held:
            devices = sorted(self.held)
            capped = self.strategy.capped([self.held[d][1] for d in devices], self.round)
            for d, w in zip(devices, capped):
                self._vote(d, self.held[d][0], float(w))
        # sum_m q_m s_m = 2 * count - total: positive where count > total // 2,
        # negative where count < ceil(total / 2) (integers, no overflow).
        counts, total = self.bits.counts(), self.bits.total_weight
        vote = (counts > total // 2).view(np.int8) - (counts < (total + 1) // 2).view(np.int8)
        decoded = {}
        for k, shape in self.shapes.items():
            start = self.offsets[k] * 8
            decoded[k] = vote[start:start + self.sizes[k]].reshape(shape)
        if self.records:
            self._record_agreement()
        stats = self.stats.mean() if self.stat_names else {}
        return self.strategy.step(self.round, self.weights, decoded, stats)

    @property
    def splittable(self) -> bool:
        # A majority vote is a sum; federated voting also needs every device's weight
        # and sampled signs, which the workers do not have.
        return not self.weighted and not self.records

    def partial(self) -> tuple[Weights, dict]:
        if not self.splittable:
            return super().partial()
        bits, bits_meta = bits_out(self.bits, "bits")
        stats, stats_meta = sums_out(self.stats, "stats.")
        return {**bits, **stats}, {"bits": bits_meta, "stats": stats_meta}

    def merge_partial(self, tensors: Weights, meta: dict) -> None:
        if not self.splittable:
            return super().merge_partial(tensors, meta)
        shapes = {k: self.all_shapes[k] for k in self.stat_names}
        only(tensors, {"bits"} | {"stats." + k for k in shapes})
        bits = bits_in(tensors, meta.get("bits"), "bits", self.bits.nbytes)
        self.stats.merge(sums_in(tensors, meta.get("stats"), "stats.", shapes))
        self.bits.merge(bits)

    def _record_agreement(self) -> None:
        """Each device against the reference vote (``SignSGDOptions.reference``: the
        others' sign(sum - q_m s_m) or the full sign(sum)) on the sample."""
        devices = sorted(self.sampled)
        bits = (np.stack([self.sampled[d] for d in devices]) >> self.where_bit) & 1
        s = bits.view(np.int8) * np.int8(2) - np.int8(1)
        if self.strategy.opts.estimate == "pairs":
            for d, v in zip(devices, pairwise_reliability(s)):
                self.strategy.votes.record(d, (1 + float(v)) / 2, 1)
            return
        q = np.array([self.q[d] for d in devices], np.int32)
        same, decided = sampled_agreement(s, q, self.strategy.opts.reference)
        for d, x, n in zip(devices, same, decided):
            self.strategy.votes.record(d, int(x), int(n))


__all__ = ["VoteFold"]
