"""The server's own compute, counted in FLOPs.

Wall seconds of the server's work differ from run to run (and from this machine to
the server a deployment would use), so a simulated round also carries the FLOPs of
the server's torch work (EcoFed's tail training, REFT's distillation), counted by
the strategies (toolkit/strategies/server/flops.py) into this process-wide total.
``records.server_time`` takes the difference over its block, as it does for seconds.
Same seeds, same shapes, same count: the simulated time built on it is reproducible.
"""
from __future__ import annotations

import threading

_lock = threading.Lock()
_total = 0


def add(flops: int) -> None:
    """Count ``flops`` of server compute."""
    global _total
    with _lock:
        _total += int(flops)


def total() -> int:
    """FLOPs counted in this process so far."""
    with _lock:
        return _total
