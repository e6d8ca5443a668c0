"""Robust aggregation rules as pure numpy functions over a round's updates.

Every rule takes ``list[Weights]`` (one dict of numpy arrays per device, the form
every strategy's ``aggregate`` already receives) and returns one ``Weights`` in
float32, like ``strategies.aggregate.weighted_average``. Internally the updates are
stacked into one float64 matrix, devices x parameters (``stack``): the rules are
translation-equivariant, so they may be given models or changes (model minus the
round's reference) alike and give the same aggregate either way.

Memory: unlike FedAvg, which folds each update into a running sum as it arrives
(O(params)), these rules need every update of the round at once: O(n x params)
float64, i.e. 8 bytes x devices x parameters (20 devices x 1M parameters: 160 MB),
plus for Krum an n x n distance matrix. ``np.median`` and the trimmed mean sort a
copy per coordinate (another n x params).

Weights (sample counts): the coordinate-wise median and the trimmed mean are
unweighted by definition (Yin et al., ICML 2018, "Byzantine-robust distributed
learning: towards optimal statistical rates"); a weighted variant would let a device
claiming a large sample count move the median, which is what the rule is there to
stop. Krum (Blanchard et al., NeurIPS 2017, "Machine learning with adversaries:
Byzantine tolerant gradient descent") selects by distances only; multi-Krum averages
the m selected updates, by ``samples`` if given (as Flower's ``Krum`` does) and
unweighted otherwise (as the paper does).
"""
from __future__ import annotations

import math

import numpy as np

from broker_server.errors import RobustError
from broker_server.robust.rows import (  # noqa: F401  (rules.stack etc. stay importable)
    Weights, clip_rows, stack, unstack, weighted_rows)

def mean(updates: list[Weights], samples: list[float] | None = None) -> Weights:
    """The (sample-weighted) mean, FedAvg's rule: the baseline the others are tested
    against, over the same stacked form."""
    x, shapes = stack(updates)
    return unstack(weighted_rows(x, samples), shapes)


def median(updates: list[Weights]) -> Weights:
    """The coordinate-wise median (even n: the mean of the two middle values)."""
    x, shapes = stack(updates)
    return unstack(np.median(x, axis=0), shapes)


def trimmed_rows(x: np.ndarray, beta: float) -> np.ndarray:
    """``trimmed_mean`` over the rows of a stacked matrix."""
    n = x.shape[0]
    k = trim_count(n, beta)
    return np.sort(x, axis=0)[k:n - k].mean(axis=0)


def trim_count(n: int, beta: float) -> int:
    """floor(beta * n) values cut from each side; at least one must remain."""
    if not 0 <= beta < 0.5:
        raise RobustError(f"trimmed mean: beta must be in [0, 0.5), got {beta}")
    k = int(math.floor(beta * n))
    if 2 * k >= n:
        raise RobustError(f"trimmed mean: beta {beta} cuts 2 x {k} of {n} updates, "
                          f"none left")
    return k


def trimmed_mean(updates: list[Weights], beta: float) -> Weights:
    """Per coordinate, drop the floor(beta * n) smallest and largest values and average
    the rest (Yin et al. 2018)."""
    x, shapes = stack(updates)
    return unstack(trimmed_rows(x, beta), shapes)


def check_krum(n: int, f: int) -> None:
    """Krum's condition n > 2f + 2 (Blanchard et al. 2017), as a one-line error."""
    if f < 0:
        raise RobustError(f"krum: f must be >= 0, got {f}")
    if n <= 2 * f + 2:
        raise RobustError(f"krum: needs more than 2f + 2 = {2 * f + 2} devices for "
                          f"f = {f}, got n = {n}")


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    """score_i = sum of the squared distances from row i to its n - f - 2 nearest others."""
    n = x.shape[0]
    check_krum(n, f)
    sq = np.einsum("ij,ij->i", x, x)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * (x @ x.T), 0.0)
    np.fill_diagonal(d, np.inf)  # a row is not its own neighbour
    return np.sort(d, axis=1)[:, :n - f - 2].sum(axis=1)


def krum_select(updates: list[Weights], f: int, m: int = 1) -> list[int]:
    """The indices of the m updates with the lowest Krum scores (ties: lower index)."""
    return krum_rows(stack(updates)[0], f, m)


def krum_rows(x: np.ndarray, f: int, m: int = 1) -> list[int]:
    """``krum_select`` over the rows of a stacked matrix."""
    n = x.shape[0]
    check_krum(n, f)
    if not 1 <= m <= n - f:
        raise RobustError(f"multi-krum: m must be in [1, n - f] = [1, {n - f}], got {m}")
    return [int(i) for i in np.argsort(krum_scores(x, f), kind="stable")[:m]]


def krum(updates: list[Weights], f: int) -> Weights:
    """The one update with the lowest Krum score."""
    return {k: np.asarray(v, np.float32) for k, v in updates[krum_select(updates, f)[0]].items()}


def multi_krum(updates: list[Weights], f: int, m: int,
               samples: list[float] | None = None) -> Weights:
    """The mean of the m lowest-scored updates, weighted by ``samples`` if given."""
    chosen = krum_select(updates, f, m)
    x, shapes = stack([updates[i] for i in chosen])
    w = None if samples is None else [samples[i] for i in chosen]
    return unstack(weighted_rows(x, w), shapes)


def check_zeno(n: int, b: int) -> None:
    if not 0 <= b < n:
        raise RobustError(f"zeno: b must be in [0, n - 1] = [0, {n - 1}], got {b}")


def zeno_scores(x: np.ndarray, loss, step: float, rho: float = 0.0) -> np.ndarray:
    """score_i = L(0) - L(step x_i) - rho |step x_i|^2: how much a step along change i
    lowers the loss on the server's own data (``loss`` of a flat change from the round's
    reference)."""
    base = loss(np.zeros(x.shape[1]))
    return np.array([base - loss(step * row) - rho * step * step * float(row @ row)
                     for row in x])


def zeno_rows(x: np.ndarray, b: int, loss, step: float, rho: float = 0.0) -> list[int]:
    """Zeno (Xie, Koyejo and Gupta, "Zeno: distributed stochastic gradient descent with
    suspicion-based fault-tolerance", ICML 2019): score each candidate by how much a step
    of size ``step`` along it lowers the loss on a small labelled set the server holds
    (its root data), less rho x the step's squared norm, and keep the n - b best. The
    rows kept, in order.

    Why a server-data rule: with non-IID shards a reversed honest change, or a model
    trained on flipped labels, is in distribution another device's honest change, so
    no statistic of the updates alone tells them apart (multi-Krum keeps them); the
    loss on data the server trusts does. Why a small step: a device's whole change
    (epochs of local SGD on a few classes) often raises the loss on the other classes
    (it overshoots), so the full step scores honest and reversed changes alike; its
    first part is a descent direction for honest devices and an ascent one for
    reversed ones. The cost: a forward pass over the root data per update, and root
    data."""
    check_zeno(x.shape[0], b)
    scores = zeno_scores(x, loss, step, rho)
    return sorted(int(i) for i in np.argsort(-scores, kind="stable")[:x.shape[0] - b])


FLTRUST_SIZES = ("clip", "server")


def fltrust_rows(x: np.ndarray, g0: np.ndarray, stats: np.ndarray | None = None,
                 size: str = "clip") -> tuple[np.ndarray, np.ndarray]:
    """FLTrust (Cao, Fang, Liu and Gong, "FLTrust: Byzantine-robust federated learning
    via trust bootstrapping", NDSS 2021): the server's own change ``g0`` (the same local
    training from the round's reference on its root data) is the yardstick. Each
    change's trust is ReLU(cos(x_i, g0)); the result is the trust-weighted mean of the
    changes after bringing them to one size. Returns (change, trust per row); no trust
    at all (every change at 90 degrees or more from g0) gives a zero change, i.e. the
    model stays.

    ``size``: ``server`` rescales every change to |g0|, as the paper does; ``clip``
    (fedge's default) only scales down a change (every column, statistics too: a
    factor <= 1 keeps a variance between the reference's and the device's) longer
    than the median norm of the round's changes. Why not the paper's: |g0| depends on
    how much root data the server holds against a device's shard, and rescaling short
    changes up inflates the step (MNIST-1D, 400 root samples, 20 devices, seed 0: |g0|
    was twice a device's change; clean accuracy after 10 rounds 0.68 against 0.83
    clipped and 0.84 FedAvg, docs/results/robust.md).

    ``stats`` (a boolean mask over the columns): BatchNorm running statistics, which
    are measured, not trained: they take no part in the cosine or |g0|, and ``server``
    leaves them unscaled (rescaled up, a variance could turn negative).

    Why it fits what the update-statistics rules miss: a reversed honest change points
    away from g0 (trust 0) however typical its norm and coordinates are, and the size
    bound takes a boosted change back to an honest size. Unlike zeno, no update is
    dropped by rank, so a device whose classes the others lack keeps a (smaller) say.
    Sample counts are not used (as in the paper): a count is the device's own claim."""
    if size not in FLTRUST_SIZES:
        raise RobustError(f"fltrust: size must be one of {', '.join(FLTRUST_SIZES)}, "
                          f"got {size!r}")
    if x.ndim != 2 or g0.shape != (x.shape[1],):
        raise RobustError(f"fltrust: server change has shape {g0.shape}, expected "
                          f"({x.shape[1]},)")
    train = np.ones(x.shape[1], bool) if stats is None else ~np.asarray(stats, bool)
    xt, gt = x[:, train], g0[train]
    norm0 = float(np.linalg.norm(gt))
    if norm0 == 0 or not np.isfinite(norm0):
        raise RobustError(f"fltrust: the server's own change has norm {norm0}, expected a "
                          f"positive finite one (is the root data empty?)")
    norms = np.linalg.norm(xt, axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    trust = np.maximum((xt @ gt) / (safe * norm0), 0.0) * (norms > 0)
    out = np.zeros(x.shape[1])
    if trust.sum() <= 0:
        return out, trust
    w = trust / trust.sum()
    if size == "server":
        out[train] = w @ (xt * (norm0 / safe)[:, None])
        out[~train] = w @ x[:, ~train]
    else:  # --clip-quantile 0.5's clip, over every column
        median = float(np.median(np.linalg.norm(x, axis=1)))
        out = w @ (clip_rows(x, median)[0] if median > 0 else x)
    return out, trust
