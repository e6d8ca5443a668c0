"""A device's local data: a ``.npz`` shard with ``x`` (features) and ``y`` (labels)."""
from __future__ import annotations

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
