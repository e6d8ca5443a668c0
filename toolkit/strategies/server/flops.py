"""Counting the FLOPs of the server's torch work (broker_server/compute.py).

torch's own counter (``torch.utils.flop_counter``: matrix products and convolutions,
forward and backward) slows the work it watches 2-10x, so a step is watched once per
shape: a training or inference step's FLOPs depend on the module's parameter shapes,
the input's shape and the kind of step, never on the values. Later steps of the same
shape add the remembered count. Elementwise work (activations, normalisation, the
optimiser) is not counted; nor is the numpy folding of updates.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from broker_server import compute

T = TypeVar("T")
_seen: dict[tuple, int] = {}
_lock = threading.Lock()


def shape_key(kind: str, module: nn.Module, *shapes: tuple[int, ...]) -> tuple:
    """What a step's FLOPs depend on: its kind, the module's parameter shapes (in
    order) and the inputs' shapes."""
    return (kind, tuple(tuple(p.shape) for p in module.parameters()),
            tuple(tuple(s) for s in shapes))


def counted(key: tuple, step: Callable[[], T]) -> T:
    """Run ``step`` and count its FLOPs (watched the first time ``key`` is seen)."""
    with _lock:
        known = _seen.get(key)
    if known is not None:
        out = step()
        compute.add(known)
        return out
    with FlopCounterMode(display=False) as meter:
        out = step()
    flops = int(meter.get_total_flops())
    with _lock:
        _seen[key] = flops
    compute.add(flops)
    return out
