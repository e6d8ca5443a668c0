"""What a round record carries to prove its aggregate and watch the aggregator's memory.

Per round the aggregator records, next to its figures, the sha256 of every
payload its fold folded, in fold order (``updates``: ``[[device, sha256], ...]``),
how many times the fold's ``add`` succeeded (``folded``) and the process's
resident memory after the round (``rss_bytes``). An outside checker holding the
payloads seen on the broker and the round's model frame can then recompute the
aggregate and compare it with the next round's model bit for bit
(``bench/soak_check.py``): a payload folded twice, or one folded that was never
sent, cannot go unnoticed. A list rather than a dict, so that a device listed
twice stays visible after a JSON round trip and the fold order is kept (float
sums depend on it).
"""
from __future__ import annotations

import hashlib
import os

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def digest(payload: bytes) -> str:
    """The sha256 of an update exactly as it travelled (header and body)."""
    return hashlib.sha256(payload).hexdigest()


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process now, from /proc/<pid>/statm; elsewhere (no /proc)
    this process's peak RSS from getrusage, the closest portable figure (0 if neither)."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        pass
    if pid != "self":
        return 0
    try:
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # macOS: bytes, else KiB
    except (ImportError, OSError):
        return 0


def round_evidence(updates: list[tuple[str, str]], folded: int, duplicates: int,
                   rejected: int) -> dict:
    """The record's evidence fields: ``updates`` (device, sha256 in fold order),
    ``folded`` (successful ``Fold.add`` calls, counted apart from the list), this
    process's cumulative ``duplicates`` and ``rejected`` counts (a restarted aggregator
    starts them at 0 again; ``pid`` tells the processes apart) and ``rss_bytes``."""
    return {"updates": [[d, s] for d, s in updates], "folded": folded,
            "duplicates_so_far": duplicates, "rejected_so_far": rejected,
            "pid": os.getpid(), "rss_bytes": rss_bytes()}
