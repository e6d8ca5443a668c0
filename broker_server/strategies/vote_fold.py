"""The signSGD vote folded straight from the sign bits (majority or federated voting).

Each update's sign bits (all tensors' packed bytes, one after another) go into
one ``BitSum`` with the device's integer voting weight: 1 for a majority vote,
``WEIGHT_STEPS * w`` for federated voting (a negative weight adds the
complemented bits, since ``-w * s = |w| * (-s)``). The vote is then
``sign(2 * count - sum |w|)`` per coordinate, the same decision as
``voting.weighted_vote`` on the unpacked signs, without unpacking any update.
The per-device agreement counters (against the others' vote, leave-one-out) are
updated from popcounts of the kept bits, corrected on the few coordinates where
one device could change the vote.
Running statistics arrive as float16 values and are averaged by samples.
"""
from __future__ import annotations

import math

import numpy as np

from broker_server.strategies.aggregate import PartialSum
from broker_server.strategies.base import Weights
from broker_server.strategies.bitsum import BitSum
from broker_server.strategies.folds import Fold
from broker_server.strategies.voting import WEIGHT_STEPS
from device_runtime.codecs.base import is_statistic
from device_runtime.codecs.bits import pack_bits, packed_size
from device_runtime.codecs.sign import check_payload


class VoteFold(Fold):
    def __init__(self, strategy, round_: int, global_weights: Weights):
        self.strategy, self.weights = strategy, global_weights
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
        self.kept: dict[str, np.ndarray] = {}
        self.q: dict[str, int] = {}

    def add(self, device: str, samples: int, tensors: Weights, params: dict) -> None:
        stats = check_payload(tensors, params, self.all_shapes)
        vec = np.concatenate([tensors[k] for k in self.shapes])
        w = self.strategy.votes.weight(device) if self.weighted else 1.0
        q = int(round(w * WEIGHT_STEPS))
        self.bits.add(vec, abs(q), invert=q < 0)
        self.kept[device] = vec
        self.q[device] = q
        self.stats.add(stats, float(samples))

    def result(self) -> Weights:
        sums = 2 * self.bits.counts().astype(np.int64) - self.bits.total_weight  # sum q s
        vote = np.sign(sums).astype(np.int8)
        decoded = {}
        for k, shape in self.shapes.items():
            start = self.offsets[k] * 8
            decoded[k] = vote[start:start + self.sizes[k]].reshape(shape)
        if self.strategy.opts.decoder == "fv":  # a majority vote never reads the counters
            self._record_agreement(sums, decoded)
        stats = self.stats.mean() if self.stat_names else {}
        return self.strategy.step(self.weights, decoded, stats)

    def _record_agreement(self, sums: np.ndarray, decoded: Weights) -> None:
        # Packed again per tensor, so that padding bits are zero in both.
        pos = np.concatenate([pack_bits(decoded[k] > 0) for k in self.shapes])
        neg = np.concatenate([pack_bits(decoded[k] < 0) for k in self.shapes])
        n = sum(self.sizes.values())
        change = self._loo_changes(sums)
        for device in sorted(self.kept):
            b = self.kept[device]
            same = int(np.bitwise_count(b & pos).sum()) + int(np.bitwise_count(~b & neg).sum())
            self.strategy.votes.record(device, same + change[device], n)

    def _pivotal(self, sums: np.ndarray) -> np.ndarray:
        """Coordinates where one device could change the vote (|sum| <= the largest
        |q|), sorted by |sum|: only there does the leave-one-out vote differ."""
        valid = np.zeros(sums.size, bool)
        for k in self.shapes:
            start = self.offsets[k] * 8
            valid[start:start + self.sizes[k]] = True
        top = max((abs(q) for q in self.q.values()), default=0)
        idx = np.flatnonzero(valid & (np.abs(sums) <= top))
        return idx[np.argsort(np.abs(sums[idx]), kind="stable")]

    def _loo_changes(self, sums: np.ndarray) -> dict[str, int]:
        """Per device: agreements with the others' vote minus those with the full vote.

        They differ only where one device's |q| can change the sign (|sum| <= |q|),
        so only those coordinates are read; devices of equal |q| are done together."""
        pivotal = self._pivotal(sums)
        at = np.abs(sums[pivotal])
        out: dict[str, int] = {}
        by_weight: dict[int, list[str]] = {}
        for d, q in self.q.items():
            by_weight.setdefault(abs(q), []).append(d)
        for w, devices in by_weight.items():
            sel = pivotal[:np.searchsorted(at, w, side="right")]
            if not sel.size:
                out.update(dict.fromkeys(devices, 0))
                continue
            rows = np.stack([self.kept[d][sel >> 3] for d in devices])
            s = ((rows >> (sel & 7).astype(np.uint8)) & 1).astype(np.int64) * 2 - 1
            q = np.array([self.q[d] for d in devices], np.int64)[:, None]
            full, others = np.sign(sums[sel]), np.sign(sums[sel] - q * s)
            diff = (s == others).sum(axis=1) - (s == full).sum(axis=1)
            out.update({d: int(x) for d, x in zip(devices, diff)})
        return out


__all__ = ["VoteFold"]
