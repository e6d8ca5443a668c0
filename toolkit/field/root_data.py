"""The aggregator's own labelled data (its root data) for the robust rules that judge
updates by it: ``zeno`` (how much a step along each update lowers the loss there) and
``fltrust`` (how far each update points from the server's own training on it).
Implements ``broker_server.robust.options.RootData`` with the job's torch model; the
rule itself stays numpy.

``fedge simulate`` uses the server's public split (``--public-fraction``, labelled,
never a device's); ``fedge serve --root-data FILE`` takes an .npz with ``x`` and ``y``.
The root data should look like the task, not like any one device (a few hundred
samples of every class; the bench uses the 400 of MNIST-1D's public split).
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from toolkit.errors import UsageError


class RootData:
    """Root data (``x``, ``y``), a copy of the job's model to score and train on it, and
    the job's local training (``train``: epochs, batch, lr; FLTrust trains as the
    devices do, so that the server's change is comparable with theirs)."""

    def __init__(self, model, x: np.ndarray, y: np.ndarray, train=None) -> None:
        from device_runtime.training.local import LocalTrainOptions

        self.model = copy.deepcopy(model)
        self.x, self.y = np.ascontiguousarray(x, np.float32), np.asarray(y, np.int64)
        self.train = train or LocalTrainOptions()

    def loss(self, weights: dict) -> float:
        from device_runtime.training.local import load_weights, predict_logits

        load_weights(self.model, weights)
        z = predict_logits(self.model, self.x).astype(np.float64)
        z -= z.max(axis=1, keepdims=True)
        return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(self.y)),
                                                                 self.y]))

    def update(self, weights: dict) -> dict:
        """The model after ``train`` from ``weights`` on the root data (fltrust's yardstick)."""
        from device_runtime.training.local import load_weights, train_local

        load_weights(self.model, weights)
        return train_local(self.model, self.x, self.y, self.train).weights


def load_root(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from an .npz with arrays ``x`` and ``y`` (one-line UsageError otherwise)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            x, y = f["x"], f["y"]
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--root-data {path}: expected an .npz with arrays x and y "
                         f"({e})") from None
    if len(x) != len(y) or len(y) == 0 or not np.issubdtype(y.dtype, np.integer):
        raise UsageError(f"--root-data {path}: expected as many integer labels y as "
                         f"samples x (at least one), got {len(x)} x and {len(y)} "
                         f"{y.dtype} y")
    return x, y


def attach(agg, root: RootData) -> None:
    """Give the aggregator's robust step its root data (used by zeno and fltrust only)."""
    robust = getattr(agg.strategy, "robust", None)
    if robust is not None:
        robust.root = root
