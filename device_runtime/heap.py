"""Keep freed heap memory for reuse instead of handing it back to the OS at once.

Every model frame, update and chunk fedge handles is a buffer of a few hundred KB to a
few MB, and each passes through several of them (the socket read, paho's copies, the
body, float64 sums). glibc returns the top of its heap to the OS as soon as more than
twice the largest recently freed block is free there, so the next message's buffers
page-faulted the same memory in again: 1,850 page faults a round in the aggregator at
16 devices, and a round bound by CPU paid for each (docs/results/field.md). With the
trim threshold raised to ``retain`` and large blocks taken from the heap below it, a
round reuses the last round's pages (about 500 faults a round).

``retain`` caps what a process keeps beyond its live memory; a device uses less than
the aggregator. ``give_back`` returns it all at once (the aggregator, as it records a
round's RSS). No-ops where the C library is not glibc. Torch-free.
"""
from __future__ import annotations

import functools

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
SERVER_RETAIN = 64 << 20
DEVICE_RETAIN = 16 << 20


def keep_freed(retain: int) -> bool:
    """Let this process keep up to ``retain`` bytes of freed heap, and take blocks below
    ``retain // 4`` from the heap rather than from fresh mappings; True if glibc took it."""
    libc = _glibc()
    if libc is None or retain <= 0:
        return False
    mmap_below = min(retain // 4, 32 << 20)  # glibc caps the mmap threshold at 32 MiB
    return bool(libc.mallopt(M_TRIM_THRESHOLD, retain)) and \
        bool(libc.mallopt(M_MMAP_THRESHOLD, mmap_below))


def give_back() -> None:
    """Return every free page of the heap to the OS now (glibc's malloc_trim): the
    aggregator does it as it records a round, so that the RSS it records is what is
    live rather than what the heap keeps (records.py). A no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def _glibc():
    import ctypes  # here: a command that never calls this starts without it

    try:
        libc = ctypes.CDLL(None)  # the C library this interpreter runs on
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.gnu_get_libc_version  # glibc only: musl and others have neither to call
    except (OSError, AttributeError):
        return None
    return libc


__all__ = ["keep_freed", "give_back", "SERVER_RETAIN", "DEVICE_RETAIN"]
