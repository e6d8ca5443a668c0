"""Aggregation maths as pure numpy functions (directly tested, no I/O)."""
from __future__ import annotations

import numpy as np

from device_runtime.codecs.base import Weights


def weighted_average(updates: list[tuple[Weights, float]]) -> Weights:
    """Sum_k n_k * w_k / sum_k n_k, per tensor; all updates must share names and shapes.

    Accumulates in float64 so that 1000 float32 updates do not lose precision,
    then returns float32.
    """
    if not updates:
        raise ValueError("weighted_average of no updates")
    total = float(sum(n for _, n in updates))
    if total <= 0:
        raise ValueError(f"weighted_average: total weight must be > 0, got {total}")
    first = updates[0][0]
    out = {}
    for name, ref in first.items():
        acc = np.zeros(ref.shape, dtype=np.float64)
        for w, n in updates:
            acc += w[name].astype(np.float64, copy=False) * (n / total)
        out[name] = acc.astype(np.float32)
    return out


class PartialSum:
    """A running weighted sum: the associative form of FedAvg that workers merge."""

    def __init__(self):
        self.sums: dict[str, np.ndarray] = {}
        self.weight = 0.0
        self.count = 0

    def add(self, w: Weights, n: float) -> None:
        for name, t in w.items():
            contrib = t.astype(np.float64, copy=False) * n
            if name in self.sums:
                self.sums[name] += contrib
            else:
                self.sums[name] = contrib.copy()
        self.weight += n
        self.count += 1

    def merge(self, other: "PartialSum") -> None:
        for name, s in other.sums.items():
            self.sums[name] = self.sums[name] + s if name in self.sums else s.copy()
        self.weight += other.weight
        self.count += other.count

    def mean(self) -> Weights:
        if self.weight <= 0:
            raise ValueError("mean of an empty partial sum")
        return {k: (v / self.weight).astype(np.float32) for k, v in self.sums.items()}
