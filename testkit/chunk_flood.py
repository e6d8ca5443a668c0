"""A chunk flood and a memory meter, for the reassembler's tests and its benchmark.

The flood is what the field test sent: one-byte chunks, each the first of a
two-chunk message that never completes, each from another sender
(``bench/chunk_flood.py`` times the reassembler under it, ``tests/test_chunking.py``
bounds its cost and memory).
"""
from __future__ import annotations

import gc
import tracemalloc
from typing import Callable

import numpy as np

from device_runtime.wire import Frame, encode


def flood_chunks(n: int, start: int = 0) -> list[tuple[str, bytes]]:
    """(topic, chunk) for messages start..start+n-1: chunk 0 of 2, one byte, a sender each."""
    return [(f"fedge/job/round/1/update/f{i}",
             encode(Frame("chunk", "job", 1, f"f{i}", "fp32",
                          {"data": np.full(1, i % 256, np.uint8)},
                          chunk={"id": f"{i:016x}", "index": 0, "count": 2,
                                 "sha256": "ab" * 32})))
            for i in range(start, start + n)]


def traced_bytes(work: Callable[[], None]) -> int:
    """How much more memory is allocated (tracemalloc) after ``work()`` than before."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    work()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return after - before
