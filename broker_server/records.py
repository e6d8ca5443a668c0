"""The aggregator's round record, with what it carries to prove its aggregate and to
watch the aggregator's memory.

Per round the record holds the round's figures (accuracy, bytes, devices, time)
and, as exactly-once evidence, the digest of every payload the round's fold
folded (``digest``: the sha256 of its signed head, which names the body's), in
fold order (``updates``: ``[[device, sha256], ...]``), how many times
the fold's ``add`` succeeded (``folded``, counted apart) and the process's
resident memory after the round (``rss_bytes``). An outside checker holding the
payloads seen on the broker and the round's model frame can then recompute the
aggregate and compare it with the next round's model bit for bit
(``testkit/soak_check.py``): a payload folded twice, or one folded that was never
sent, cannot go unnoticed. A list rather than a dict, so that a device listed
twice stays visible after a JSON round trip and the fold order is kept (float
sums depend on it).

``RoundState`` is what the aggregator keeps about the open round, the record's source.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from broker_server import compute
from broker_server.guard import rms
from broker_server.strategies.folds import Fold
from device_runtime import heap, messages, wire

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def digest(payload: bytes) -> str:
    """What names an update exactly as it travelled: the sha256 of its head (magic,
    header length, header and the 64 bytes after it: a signed frame's signature). The
    header names the body's sha256, which every receiver checks before it folds or
    saves an update, so the head binds the body; hashing it costs the header's bytes,
    not a second pass over the update (which cost the aggregator as much sha256 time
    as the body's own check, in a profile at 16 devices). Bytes that are not a frame
    are hashed whole."""
    view = memoryview(payload)
    if len(view) >= wire.PREFIX and bytes(view[:4]) == wire.MAGIC:
        (h,) = struct.unpack_from("<I", view, 4)
        head = wire.PREFIX + h + wire.SIGNATURE
        if head <= len(view):
            return hashlib.sha256(view[:head]).hexdigest()
    return hashlib.sha256(view).hexdigest()


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


def trim_heap() -> None:
    """Give the C heap's free pages back to the OS, so that RSS measures what is live
    rather than what the allocator kept from the round's transient buffers (+-10 MiB
    jumps from round to round without it; ``heap.give_back``)."""
    heap.give_back()


def round_evidence(updates: list[tuple[str, str]], folded: int, duplicates: int,
                   rejected: int) -> dict:
    """The record's evidence fields: ``updates`` (device, sha256 in fold order),
    ``folded`` (successful ``Fold.add`` calls), this
    process's cumulative ``duplicates`` and ``rejected`` counts (a restarted aggregator
    starts them at 0 again; ``pid`` tells the processes apart) and ``rss_bytes``
    (after ``trim_heap``)."""
    trim_heap()
    return {"updates": [[d, s] for d, s in updates], "folded": folded,
            "duplicates_so_far": duplicates, "rejected_so_far": rejected,
            "pid": os.getpid(), "rss_bytes": rss_bytes()}


def round_record(rs, accuracy: float | None, duplicates: int, rejected: int) -> dict:
    """The record of the closed round ``rs`` (a ``RoundState``), evidence included."""
    updates = [rs.accepted[d] for d in sorted(rs.accepted)]
    return {"round": rs.number, "accuracy": accuracy, "uplink_bytes": rs.uplink_bytes,
            "downlink_bytes": rs.downlink_bytes, "devices_reporting": len(updates),
            "devices_assigned": len(rs.assigned),
            "seconds": round(time.time() - rs.started, 3),
            "server_seconds": round(rs.server_seconds, 4),
            "server_flops": rs.server_flops,
            "train_seconds_max": max((messages.seconds_of(u.get("train_seconds"))
                                      for u in updates), default=0.0),
            "accepted": sorted(rs.accepted),
            **train_loss(rs.accepted),
            # The guard's measure of each accepted update (docs/results/guard.md).
            "change_rms": {d: rs.norms[d] for d in sorted(rs.norms)},
            "reference_rms": rms(rs.references.get("full", {})),
            "refused": sorted(rs.refused),
            **(rs.fold.record() if rs.fold is not None else {}),
            **round_evidence(rs.folded, len(rs.folded), duplicates, rejected)}


def train_loss(accepted: dict[str, dict]) -> dict:
    """``loss``: the sample-weighted mean of the devices' reported training loss (None
    if none reported one); ``device_loss``: each reporting device's (the dashboard's
    per-profile figures). Meta is the device's word: only finite numbers count."""
    per = {d: float(m["loss"]) for d, m in sorted(accepted.items())
           if isinstance(m.get("loss"), (int, float)) and math.isfinite(m["loss"])}
    weights = {d: float(accepted[d]["samples"]) if isinstance(accepted[d].get("samples"), int)
               else 0.0 for d in per}
    total = sum(w for w in weights.values() if w > 0)
    mean = sum(per[d] * w for d, w in weights.items() if w > 0) / total if total else None
    return {"loss": None if mean is None else round(mean, 6),
            "device_loss": {d: round(v, 6) for d, v in per.items()}}


class Refusals:
    """Refused messages: a count per kind and reason, the first ``KEEP`` in full, and a
    log line for the first of each reason (then every 1000th), so that a flood of
    forged chunks costs neither memory nor log. Called from the transport's thread too."""

    KEEP = 200

    def __init__(self, log) -> None:
        self.log, self.total, self.kept = log, 0, []
        self.by_reason: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, where: dict, why: str) -> None:
        reason = f"{where.get('kind')}: {why.split(':')[0][:80]}"
        with self._lock:
            self.total += 1
            n = self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            if len(self.kept) < self.KEEP:
                self.kept.append({"round": where.get("round"), "device": where.get("device"),
                                  "kind": where.get("kind"), "reason": why})
        if n == 1 or n % 1000 == 0:
            self.log.warning("rejected %s from %s (#%d of its kind): %s", where.get("kind"),
                             where.get("device"), n, why)


def job_report(agg) -> dict:
    """The job's report from an ``Aggregator``: its settings, every round's record and
    the totals."""
    hist = agg.state.history
    return {"job": agg.opts.job, "strategy": agg.opts.strategy, "codec": agg.opts.codec,
            "downlink": agg.opts.downlink,
            "rounds": hist, "final_accuracy": hist[-1]["accuracy"] if hist else None,
            "resumed_from": agg.resumed_from, "rejected": agg.rejected.kept,
            "rejected_total": agg.rejected.total,
            "rejected_by_reason": dict(agg.rejected.by_reason),
            "device_errors": dict(agg.device_errors),
            "duplicates": agg.duplicates,
            "uplink_bytes_total": sum(h["uplink_bytes"] for h in hist),
            "downlink_bytes_total": sum(h["downlink_bytes"] for h in hist),
            **agg.strategy.report()}


@dataclass
class RoundState:
    number: int
    assigned: dict[str, messages.Task] = field(default_factory=dict)
    accepted: dict[str, dict] = field(default_factory=dict)  # device -> the update's meta
    fold: Fold | None = None  # the round's aggregate so far
    deadline: float = 0.0
    started: float = 0.0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    model_sha: dict[str, str] = field(default_factory=dict)
    model_bytes: dict[str, int] = field(default_factory=dict)
    frames: dict[str, bytes] = field(default_factory=dict)
    shapes: dict[str, dict] = field(default_factory=dict)  # variant -> {name: shape}
    reference: dict = field(default_factory=dict)  # the full model devices train from
    sync: bytes | None = None  # the coded change to it from last round's (downlink)
    base_sha: str = ""  # sha256 of last round's model frame, the sync's base
    sync_sha: str = ""  # sha256 of the sync frame, named in every task
    via: dict[str, str] = field(default_factory=dict)  # device -> "sync"/"full", counted
    references: dict = field(default_factory=dict)  # variant -> the weights it was sent
    norms: dict[str, float] = field(default_factory=dict)  # device -> accepted change RMS
    refused: set[str] = field(default_factory=set)  # by the guard: not waited for
    # Exactly-once evidence: (device, sha256 of the payload) of each successful
    # Fold.add, in fold order (a device folded twice shows twice).
    folded: list[tuple[str, str]] = field(default_factory=list)
    resent_at: float = 0.0  # when tasks were last re-sent past the deadline
    # Wall seconds of the server's own compute this round: folding updates in (decode,
    # screen) and the fold's result (e.g. EcoFed's tail training, REFT's distillation).
    server_seconds: float = 0.0
    # The FLOPs of that compute's torch work (compute.py): the same on every run.
    server_flops: int = 0


@contextmanager
def server_time(rs: "RoundState") -> Iterator[None]:
    """Add the wall time of the block to ``rs.server_seconds`` and the FLOPs counted in
    it to ``rs.server_flops`` (the server's compute)."""
    t0, f0 = time.perf_counter(), compute.total()
    try:
        yield
    finally:
        rs.server_seconds += time.perf_counter() - t0
        rs.server_flops += compute.total() - f0
