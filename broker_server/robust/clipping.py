"""Norm clipping of updates and central differential privacy, as pure numpy functions.

Clipping acts on the change, ``update - reference`` (the round's global model), over
all tensors of an update together: a change of L2 norm above the bound C is scaled
down to norm C, so no device moves the sum by more than C (Sun et al. 2019, "Can you
really backdoor federated learning?"). The bound is fixed, or adaptive: the q-quantile
of this round's change norms (q = 0.5: the median norm), so that an honest round is
hardly touched and a boosted update is cut to an honest size.

Central DP (DP-FedAvg, McMahan et al., ICLR 2018, "Learning differentially private
recurrent language models"): the clipped changes are summed, unweighted (a device's
sample count would scale its contribution past C), Gaussian noise of std
``noise_multiplier`` x C is added to the sum, and the sum is divided by the number of
devices. The accounting (``accountant.epsilon``) holds only for a fixed C: the
adaptive bound is a function of the round's own updates, not private itself, so
``options.RobustOptions.check`` refuses DP with it.

Clipping and DP are streaming-friendly: each change can be clipped as it arrives and
folded into a running sum (O(params)), except the adaptive bound, which needs every
norm of the round first (n floats, or the updates, if they are not kept elsewhere).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from broker_server.errors import RobustError
from broker_server.robust.rows import (  # noqa: F401  (clipping.clip_rows stays importable)
    Weights, clip_rows, stack, unstack, weighted_rows)


@dataclass(frozen=True)
class Clipped:
    """The round's clipped changes and what clipping did."""

    changes: np.ndarray  # n x params float64, each row of norm <= bound
    shapes: dict[str, tuple[int, ...]]
    bound: float
    norms: np.ndarray  # the norms before clipping
    clipped: int  # how many rows were scaled down


def changes(updates: list[Weights], reference: Weights) -> tuple[np.ndarray, dict]:
    """(n x params matrix of update - reference, shapes); the reference must have the
    updates' layout."""
    x, shapes = stack(updates)
    ref, ref_shapes = stack([reference])
    if ref_shapes != shapes:
        raise RobustError(f"clipping: reference has tensors {ref_shapes}, updates {shapes}")
    return x - ref[0], shapes


def adaptive_bound(norms: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of the round's norms (linear interpolation, numpy's default)."""
    if not 0 < quantile <= 1:
        raise RobustError(f"clipping: quantile must be in (0, 1], got {quantile}")
    return float(np.quantile(norms, quantile))


def clip_updates(updates: list[Weights], reference: Weights, bound: float = 0.0,
                 quantile: float = 0.0) -> Clipped:
    """Clip each change to ``bound``, or (``bound`` 0) to the ``quantile`` of the norms."""
    x, shapes = changes(updates, reference)
    if (bound > 0) == (quantile > 0):
        raise RobustError(f"clipping: give one of bound and quantile, got bound={bound}, "
                          f"quantile={quantile}")
    if quantile > 0:
        bound = adaptive_bound(np.linalg.norm(x, axis=1), quantile)
        if bound <= 0:  # every change is zero at that quantile: nothing to scale
            return Clipped(x, shapes, 0.0, np.linalg.norm(x, axis=1), 0)
    y, norms, n = clip_rows(x, bound)
    return Clipped(y, shapes, float(bound), norms, n)


def apply(reference: Weights, change: np.ndarray, shapes: dict) -> Weights:
    """reference + change, as float32 tensors."""
    ref, _ = stack([reference])
    return unstack(ref[0] + change, shapes)


def clipped_mean(updates: list[Weights], reference: Weights, bound: float = 0.0,
                 quantile: float = 0.0, samples: list[float] | None = None) -> Weights:
    """FedAvg over clipped changes: reference + the (sample-weighted) mean change."""
    c = clip_updates(updates, reference, bound, quantile)
    return apply(reference, weighted_rows(c.changes, samples), c.shapes)


def dp_sum(clipped: np.ndarray, bound: float, noise_multiplier: float,
           rng: np.random.Generator) -> np.ndarray:
    """sum of the rows + N(0, (noise_multiplier x bound)^2) per coordinate. The rows
    must already be clipped to ``bound``: the noise covers one row's worth, no more."""
    if not bound > 0 or not noise_multiplier > 0:
        raise RobustError(f"dp: bound and noise multiplier must be > 0, got bound={bound}, "
                          f"noise_multiplier={noise_multiplier}")
    norms = np.linalg.norm(clipped, axis=1)
    if (norms > bound * (1 + 1e-9)).any():
        raise RobustError(f"dp: a row of norm {norms.max():.6g} exceeds the bound {bound}: "
                          f"clip before adding noise")
    noise = rng.normal(0.0, noise_multiplier * bound, size=clipped.shape[1])
    return clipped.sum(axis=0) + noise


def dp_mean(updates: list[Weights], reference: Weights, bound: float,
            noise_multiplier: float, rng: np.random.Generator,
            expected: int | None = None) -> Weights:
    """Central DP FedAvg: reference + (sum of clipped changes + noise) / count.

    ``expected`` (the expected number of devices a round, q x population) divides
    instead of the actual count, as DP-FedAvg's fixed-denominator estimator does: the
    actual count is itself private under Poisson sampling. None: the actual count."""
    c = clip_updates(updates, reference, bound=bound)
    total = dp_sum(c.changes, c.bound, noise_multiplier, rng)
    return apply(reference, total / float(expected or len(updates)), c.shapes)
