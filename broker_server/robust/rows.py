"""The stacked form every robust rule works in: one float64 row per device.

``stack`` turns a round's updates (one dict of numpy arrays per device) into an
n x params matrix, checking every update has the first one's layout and only finite
values; ``unstack`` turns one row back into float32 tensors. ``weighted_rows`` is the
(sample-weighted) mean of rows and ``clip_rows`` scales rows down to a norm bound:
the two row operations both the rules (``rules``) and clipping/DP (``clipping``)
build on, kept here so that neither imports the other.
"""
from __future__ import annotations

import math

import numpy as np

from broker_server.errors import RobustError

Weights = dict[str, np.ndarray]


def stack(updates: list[Weights]) -> tuple[np.ndarray, dict[str, tuple[int, ...]]]:
    """(n x params float64 matrix, the first update's shapes in its order).

    Every update must have the first one's tensor names and shapes: a device that
    sends another layout is an error here, not a silent misalignment."""
    if not updates:
        raise RobustError("robust aggregation of no updates")
    shapes = {k: tuple(v.shape) for k, v in updates[0].items()}
    rows = []
    for i, u in enumerate(updates):
        got = {k: tuple(v.shape) for k, v in u.items()}
        if got != shapes:
            raise RobustError(f"robust: update {i} has tensors {got}, expected {shapes}")
        row = (np.concatenate([np.asarray(u[k], np.float64).reshape(-1) for k in shapes])
               if shapes else np.zeros(0))
        if not np.isfinite(row).all():  # the guard refuses these first; a NaN would
            # pass through median and Krum's sort as if it were a value
            raise RobustError(f"robust: update {i} has {int((~np.isfinite(row)).sum())} "
                              f"non-finite values, expected none")
        rows.append(row)
    return np.stack(rows), shapes


def unstack(vec: np.ndarray, shapes: dict[str, tuple[int, ...]]) -> Weights:
    """One flat vector back into float32 tensors of ``shapes``."""
    out, at = {}, 0
    for k, s in shapes.items():
        size = math.prod(s)
        out[k] = vec[at:at + size].astype(np.float32).reshape(s)
        at += size
    return out


def weighted_rows(x: np.ndarray, samples: list[float] | None) -> np.ndarray:
    if samples is None:
        return x.mean(axis=0)
    w = np.asarray(samples, np.float64)
    if w.shape != (x.shape[0],) or w.sum() <= 0 or (w < 0).any():
        raise RobustError(f"robust: samples must be {x.shape[0]} non-negative counts with "
                          f"a positive total, got {list(samples)}")
    return w @ x / w.sum()


def clip_rows(x: np.ndarray, bound: float) -> tuple[np.ndarray, np.ndarray, int]:
    """(rows scaled to norm <= bound, their norms before, how many were scaled)."""
    if not bound > 0:
        raise RobustError(f"clipping: bound must be > 0, got {bound}")
    norms = np.linalg.norm(x, axis=1)
    scale = np.minimum(1.0, bound / np.maximum(norms, 1e-300))
    return x * scale[:, None], norms, int((scale < 1.0).sum())
