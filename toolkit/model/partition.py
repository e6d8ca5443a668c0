"""Non-IID partitions of a training set over devices, and writing the shards.

The maths are pure numpy functions of labels and a seed, so they are tested
directly; ``write_partition`` is the orchestration behind ``fedge partition``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from toolkit.errors import UsageError
from toolkit.model.datasets import Dataset


def dirichlet_split(labels: np.ndarray, devices: int, alpha: float, seed: int,
                    min_samples: int = 10, max_tries: int = 100,
                    top_up: bool = False) -> list[np.ndarray]:
    """Per class, split its samples over devices by proportions ~ Dir(alpha).

    Redraws (up to ``max_tries``) until every device holds ``min_samples``; a
    small alpha gives each device few classes. With ``top_up``, when no draw fits,
    the last one is topped up instead of refused: each short device gets random
    samples of the largest shards. A fleet with a few samples per device needs it
    (1,000 devices on 3,600 samples: some hold none in any draw, whatever alpha).
    """
    if devices < 1:
        raise UsageError(f"devices: expected >= 1, got {devices}")
    if alpha <= 0:
        raise UsageError(f"alpha: expected > 0, got {alpha}")
    if len(labels) < devices * min_samples:
        raise UsageError(f"devices: {devices} devices x {min_samples} samples exceed "
                         f"the {len(labels)} training samples")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(devices)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(devices, alpha))
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if min(len(s) for s in shards) >= min_samples:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    if top_up:
        _top_up(shards, min_samples, rng)
        return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    raise UsageError(f"alpha: no Dirichlet({alpha}) split gave every one of {devices} "
                     f"devices {min_samples} samples in {max_tries} draws; raise alpha")


def _top_up(shards: list[list[int]], min_samples: int, rng: np.random.Generator) -> None:
    """Move random samples from the largest shard to each short one, until every shard
    holds ``min_samples`` (the caller checked there are enough in all)."""
    sizes = np.array([len(s) for s in shards])
    for k in np.flatnonzero(sizes < min_samples):
        while sizes[k] < min_samples:
            donor = int(np.argmax(sizes))
            shards[k].append(shards[donor].pop(int(rng.integers(sizes[donor]))))
            sizes[k] += 1
            sizes[donor] -= 1


def classes_split(labels: np.ndarray, devices: int, classes_per_device: int,
                  seed: int) -> list[np.ndarray]:
    """Each device gets ``classes_per_device`` classes; a class is shared evenly
    among the devices holding it. Classes are dealt round-robin so all are used."""
    classes = np.unique(labels)
    if not 1 <= classes_per_device <= len(classes):
        raise UsageError(f"classes_per_device: expected 1..{len(classes)}, "
                         f"got {classes_per_device}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(classes)
    held = [[order[(k * classes_per_device + j) % len(order)]
             for j in range(classes_per_device)] for k in range(devices)]
    holders = {c: [k for k in range(devices) if c in held[k]] for c in classes}
    shards: list[list[int]] = [[] for _ in range(devices)]
    for c, ks in holders.items():
        if not ks:
            continue
        idx = rng.permutation(np.flatnonzero(labels == c))
        for k, part in zip(ks, np.array_split(idx, len(ks))):
            shards[k].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def public_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the server's public split and of the rest (for the devices)."""
    if not 0 <= fraction < 1:
        raise UsageError(f"public_fraction: expected in [0, 1), got {fraction}")
    order = np.random.default_rng(seed + 1).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(order[:cut]), np.sort(order[cut:])


def write_partition(ds: Dataset, out: str | Path, devices: int, seed: int,
                    alpha: float | None = 0.5, classes_per_device: int | None = None,
                    public_fraction: float = 0.1) -> dict:
    """Write ``device-<k>.npz`` per device and ``server.npz`` (public split + test set).

    Device shards hold only ``x`` and ``y``; the server file holds the public
    split as ``x``, ``y`` and the test set as ``x_test``, ``y_test``, so it is
    itself a dataset that ``fedge pretrain --dataset server.npz`` accepts.
    """
    out = Path(out)
    pub, rest = public_split(len(ds.y_train), public_fraction, seed)
    labels = ds.y_train[rest]
    if classes_per_device is not None:
        parts = classes_split(labels, devices, classes_per_device, seed)
    else:
        parts = dirichlet_split(labels, devices, alpha if alpha is not None else 0.5, seed)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"dataset": ds.name, "devices": [], "seed": seed, "alpha": alpha,
               "classes_per_device": classes_per_device, "public_samples": int(len(pub))}
    for k, part in enumerate(parts):
        idx = rest[part]
        name = f"device-{k}.npz"
        np.savez(out / name, x=ds.x_train[idx], y=ds.y_train[idx])
        hist = np.bincount(ds.y_train[idx], minlength=ds.num_classes).tolist()
        summary["devices"].append({"file": name, "samples": int(len(idx)),
                                   "class_counts": hist})
    np.savez(out / "server.npz", x=ds.x_train[pub], y=ds.y_train[pub],
             x_test=ds.x_test, y_test=ds.y_test)
    (out / "partition.json").write_text(json.dumps(summary, indent=1))
    return summary
