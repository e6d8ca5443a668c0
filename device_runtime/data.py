"""A device's local data: a ``.npz`` shard with ``x`` (features) and ``y`` (labels)."""
from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from device_runtime.errors import InputArrayError


def load_shard(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise InputArrayError(f"data shard {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "x" not in f.files or "y" not in f.files:
                raise InputArrayError(f"data shard {path}: expected arrays 'x' and 'y', "
                                      f"has {', '.join(f.files) or 'none'}")
            x, y = f["x"], f["y"]
    except (ValueError, OSError, EOFError) as e:
        raise InputArrayError(f"data shard {path} is not a readable .npz: {e}") from None
    if x.dtype.kind not in "fiu" or x.ndim < 2:
        raise InputArrayError(f"data shard {path}: x must be numeric (samples, ...), got "
                              f"{x.dtype} {x.shape}")
    if y.dtype.kind not in "iu" or y.shape != (len(x),):
        raise InputArrayError(f"data shard {path}: y must be {len(x)} integer labels, got "
                              f"{y.dtype} {y.shape}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise InputArrayError(f"data shard {path}: x has NaN or infinite values")
    return x, y.astype(np.int64)


def holdout_split(x: np.ndarray, y: np.ndarray, fraction: object, device: str
                  ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x, y) to train on, (x, y) held out for evaluation): ``fraction`` of the shard,
    drawn by a permutation seeded by the device id, so a restarted device holds out
    the same samples and never trains on them."""
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or \
            not 0.0 <= fraction < 1.0:  # from the (signed) plan: still checked
        raise InputArrayError(f"plan.train.holdout: expected a fraction in [0, 1), got "
                              f"{fraction!r}")
    n_eval = int(round(len(y) * fraction))
    if n_eval == 0:
        return (x, y), (x[:0], y[:0])
    order = np.random.default_rng(zlib.crc32(device.encode())).permutation(len(y))
    held, kept = np.sort(order[:n_eval]), np.sort(order[n_eval:])
    return (x[kept], y[kept]), (x[held], y[held])
