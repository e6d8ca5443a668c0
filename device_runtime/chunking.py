"""Chunking: frames above a broker's payload limit, cut into chunk frames and put back
(the cutting, ``split``, in ``device_runtime.chunk_split``).

A chunk is itself a frame (kind ``"chunk"``) with one uint8 tensor ``"data"``
holding a slice of the original frame's bytes, the original's job, round,
device and codec, and ``chunk = {id, index, count, sha256}`` where ``sha256`` is
the sha256 of the chunks' body digests in order (``chunk_split.chunk_root``): a
hash over the whole original frame's bytes, made from the digests each chunk
carries. Every chunk therefore passes the full frame decoder (its own body sha256
included) before ``Reassembler`` keeps it, and the digests of the pieces put back
are checked against ``chunk.sha256`` before they are returned: each byte is hashed
once at each end.

The reassembler is built to survive a flood of chunks (``ReassemblyLimits``): it
keeps a running count of the bytes it holds (payload plus a measured overhead per
message and per chunk), refuses a chunk that would pass a cap per sender, per
topic or in all (``ChunkRefusedError``, nothing held changes, nobody else's
message is evicted), and adds and expires in O(1) amortized: messages sit in
arrival order, so expiry pops from the front and never scans.
"""
from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

# split, the sender's side, is here too: a caller cuts and puts back through one module
from device_runtime.chunk_split import chunk_frame, split  # noqa: F401
from device_runtime.errors import ChunkRefusedError, WireError
from device_runtime.strict_json import short
from device_runtime.topics import sender_of
from device_runtime.wire import Expect, Frame, encode, open_frame, peek_header

# What holding costs beyond the payload bytes, measured with tracemalloc (CPython
# 3.11, 64-bit; tests/test_chunking.py checks the running count against tracemalloc,
# bench/chunk_flood.py reports it). Each is a little above its measure, so
# ``held_bytes`` errs high. Per message: its record, its slot in the
# arrival order, its key and digests, its index -> bytes dict (measured ~720). Per
# chunk: the bytes object's header and its slot in that dict (50..100). Per sender
# and per topic with messages held: its counter entry (~135, ~30). Per finished id
# remembered against redeliveries (``max_closed`` at most, outside ``held_bytes``): ~190.
PARTIAL_OVERHEAD = 768
PART_OVERHEAD = 112
DIGEST_BYTES = 32  # per chunk of a message: its body's sha256, kept until it completes
SENDER_OVERHEAD = 160
TOPIC_OVERHEAD = 48
CLOSED_OVERHEAD = 192


@dataclass(frozen=True)
class ReassemblyLimits:
    """What a ``Reassembler`` holds at most. Bytes count payload plus the overheads
    above, and a message is charged its whole expected size from its first chunk
    on. The sender is ``topics.sender_of(topic)``."""

    ttl: float = 60.0  # seconds from a message's first chunk until it is dropped
    max_bytes: int = 256 << 20  # in all
    max_bytes_per_sender: int = 128 << 20  # so one sender cannot take everything
    max_partials_per_sender: int = 16  # an honest sender has a few messages in flight
    max_partials_per_topic: int = 4  # one at a time, or two around a republish
    max_closed: int = 1 << 14  # finished ids remembered (oldest forgotten first)

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not value > 0:  # a bug in the caller, not bad input: a plain ValueError
                raise ValueError(f"ReassemblyLimits.{name}: expected > 0, got {value!r}")


class _Partial:
    """The chunks of one message received so far."""

    __slots__ = ("count", "sha256", "origin", "started", "sender", "topic", "parts",
                 "digests", "held", "expect")

    def __init__(self, count: int, sha256: bytes, origin: bytes, started: float,
                 sender: bytes, topic: bytes, chunk_bytes: int) -> None:
        self.count, self.sha256, self.origin, self.started = count, sha256, origin, started
        self.sender, self.topic = sender, topic
        self.parts: dict[int, bytes] = {}
        # each part's body sha256 (checked by its decode) at 32 x its index: allocated
        # with the first part, once the message was admitted
        self.digests = bytearray()
        # PARTIAL_OVERHEAD + DIGEST_BYTES x count + (PART_OVERHEAD + len) per part so far
        self.held = 0
        # Reserved from the first chunk on (all chunks but the last are as long), so
        # an admitted message can complete whatever else arrives meanwhile.
        self.expect = PARTIAL_OVERHEAD + count * (PART_OVERHEAD + DIGEST_BYTES + chunk_bytes)

    @property
    def charged(self) -> int:
        return max(self.held, self.expect)


def _digest(*texts: str) -> bytes:
    # Keys are fixed-size digests: topics, ids and origins are the sender's choice
    # (up to the 64 KiB header), and what is held must not grow with them.
    h = hashlib.blake2b(digest_size=16)
    for t in texts:
        b = t.encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(4, "little") + b)
    return h.digest()


class Reassembler:
    """Collects chunk frames and returns each original frame once it is complete.

    Messages are told apart by (topic, chunk id), so a chunk on one topic cannot
    touch a message on another. A message whose chunks disagree (count, index,
    sha256, origin, or two different payloads for one index) is dropped as a whole,
    and so is one that fails the final sha256 check. A chunk that would pass a
    limit of ``limits`` raises ``ChunkRefusedError`` and changes nothing held; a
    message is charged its expected size (count x its first chunk) from its first
    chunk on, so the caps refuse new messages and never starve admitted ones.
    Messages expire ``ttl`` after their first chunk. Ids that completed or were
    dropped are remembered for ``ttl`` (at most ``max_closed`` of them), so a QoS 1
    redelivery of one of their chunks is ignored rather than starting a message
    that can never complete. Thread-safe.

    ``add`` is where a chunk is first held; a transport that refuses chunks
    (unsigned, from a device without an open task) does so before calling it.
    """

    def __init__(self, limits: ReassemblyLimits | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = limits or ReassemblyLimits()
        self._clock = clock
        # Both in arrival order: with one ttl for all, the oldest is always first.
        self._partials: OrderedDict[bytes, _Partial] = OrderedDict()
        self._closed: OrderedDict[bytes, float] = OrderedDict()  # key -> when it closed
        self._by_sender: dict[bytes, list[int]] = {}  # sender -> [messages, bytes charged]
        self._by_topic: dict[bytes, int] = {}  # topic -> messages
        self._held = 0  # what is in memory
        self._charged = 0  # what the caps see: held, or reserved where more
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        """The memory held by incomplete messages: payload plus the overheads above."""
        return self._held

    @property
    def charged_bytes(self) -> int:
        """``held_bytes`` with each message counted at its expected size if larger."""
        return self._charged

    @property
    def closed_bytes(self) -> int:
        """About what the ids remembered against redeliveries hold (``max_closed`` bounds it)."""
        return len(self._closed) * CLOSED_OVERHEAD

    @property
    def partials(self) -> int:
        """Incomplete messages held."""
        return len(self._partials)

    def add(self, chunk: bytes | Frame, topic: str = "", header: dict | None = None
            ) -> bytes | None:
        """The original frame's bytes once its last chunk arrived, else None. ``topic``
        is the message's topic (without the chunk suffix); it names the sender.
        ``header``: the chunk's header as ``wire.peek_header`` validated it from these
        bytes (a transport's gate did), so it is not parsed again; the body is still
        checked against it."""
        # A Frame is checked exactly like received bytes: by the decoder.
        data = encode(chunk) if isinstance(chunk, Frame) else chunk
        try:
            header, body = open_frame(data, Expect(kind="chunk"), header=header)
        except WireError:
            self._drop_id_of(data, topic)
            raise
        if "chunk" not in header:
            raise WireError("header.chunk: expected an object in a chunk frame, got nothing")
        tensors = header["tensors"]
        if [(t["name"], t["dtype"], len(t["shape"])) for t in tensors] != [("data", "uint8", 1)]:
            got = [f"{t['name']}: {t['dtype']}{t['shape']}" for t in tensors]
            raise WireError(f"header.tensors: expected one 1-d uint8 tensor 'data' in a chunk "
                            f"frame, got {got}")
        frame = Frame("chunk", header["job"], header["round"], header["device"],
                      header["codec"], chunk=header["chunk"])
        with self._lock:
            self._expire(self._clock())
            return self._add(frame, bytes(body), bytes.fromhex(header["sha256"]), topic)

    def expire(self) -> int:
        """Drop the messages whose first chunk is older than ``ttl``; how many.
        ``add`` does this too, so a caller need not."""
        with self._lock:
            return self._expire(self._clock())

    def _expire(self, now: float) -> int:
        ttl, n = self.limits.ttl, 0
        while self._partials:
            key, p = next(iter(self._partials.items()))
            if now - p.started <= ttl:
                break
            self._close(key)
            n += 1
        while self._closed and now - next(iter(self._closed.values())) > ttl:
            self._closed.popitem(last=False)
        return n

    def _add(self, frame: Frame, payload: bytes, digest: bytes, topic: str) -> bytes | None:
        c = frame.chunk
        cid, index = c["id"], c["index"]
        where = f"chunk {short(cid, 40)} index {index}"
        key = _digest(topic, cid)
        if key in self._closed:
            return None
        origin = (frame.job, frame.round, frame.device, frame.codec)
        p = self._partials.get(key)
        if p is None:
            p = self._admit(key, c, _digest(*map(str, origin)), len(payload), topic, where)
        else:
            self._check_same(key, p, c, origin, where)
            if index in p.parts:
                if p.parts[index] == payload:
                    return None  # a redelivery
                self._close(key)
                raise WireError(f"{where}: expected the same bytes as its first copy, got "
                                f"different bytes")
        cost = PART_OVERHEAD + len(payload) + \
            (PARTIAL_OVERHEAD + DIGEST_BYTES * p.count if not p.parts else 0)
        extra = max(p.held + cost, p.expect) - p.charged  # beyond its reservation
        if extra:
            self._check_bytes(p.sender, extra, where, topic)
        if not p.parts:
            p.digests = bytearray(DIGEST_BYTES * p.count)
        p.parts[index] = payload
        p.digests[DIGEST_BYTES * index:DIGEST_BYTES * (index + 1)] = digest
        p.held += cost
        self._held += cost
        self._charged += extra
        self._by_sender[p.sender][1] += extra
        if len(p.parts) < p.count:
            return None
        self._close(key)
        got = hashlib.sha256(p.digests).digest()  # chunk_root of the digests in order
        if got != p.sha256:
            raise WireError(f"chunk {short(cid, 40)}: sha256 of the chunks' digests: expected "
                            f"{p.sha256.hex()[:16]}..., got {got.hex()[:16]}...")
        return b"".join(p.parts[i] for i in range(p.count))

    def _admit(self, key: bytes, c: dict, origin: bytes, chunk_bytes: int, topic: str,
               where: str) -> _Partial:
        """Start holding a message, or refuse it past a cap (then nothing changes)."""
        lim, sender = self.limits, sender_of(topic)
        p = _Partial(c["count"], bytes.fromhex(c["sha256"]), origin, self._clock(),
                     _digest(sender), _digest(topic), chunk_bytes)
        of_sender = self._by_sender.get(p.sender, (0, 0))[0]
        if of_sender >= lim.max_partials_per_sender:
            raise ChunkRefusedError(f"{where}: incomplete messages from {short(sender)}: "
                                    f"expected at most {lim.max_partials_per_sender}, "
                                    f"got {of_sender + 1}")
        on_topic = self._by_topic.get(p.topic, 0)
        if on_topic >= lim.max_partials_per_topic:
            raise ChunkRefusedError(f"{where}: incomplete messages on this topic: expected at "
                                    f"most {lim.max_partials_per_topic}, got {on_topic + 1}")
        entries = (SENDER_OVERHEAD * (p.sender not in self._by_sender)
                   + TOPIC_OVERHEAD * (p.topic not in self._by_topic))
        self._check_bytes(p.sender, p.expect + entries, where, topic)
        # Held from here on, charged its reservation; its chunk is added by the caller.
        self._partials[key] = p
        counts = self._by_sender.setdefault(p.sender, [0, 0])
        counts[0] += 1
        counts[1] += p.expect + entries
        self._by_topic[p.topic] = self._by_topic.get(p.topic, 0) + 1
        self._held += entries
        self._charged += p.expect + entries
        return p

    def _check_bytes(self, sender: bytes, extra: int, where: str, topic: str) -> None:
        """Refuse ``extra`` bytes past its sender's cap or the cap in all."""
        lim = self.limits
        of_sender = self._by_sender.get(sender, (0, 0))[1] + extra
        if of_sender > lim.max_bytes_per_sender:
            raise ChunkRefusedError(f"{where}: bytes held for {short(sender_of(topic))}: "
                                    f"expected at most {lim.max_bytes_per_sender}, "
                                    f"got {of_sender}")
        total = self._charged + extra
        if total > lim.max_bytes:
            raise ChunkRefusedError(f"{where}: bytes held in all: expected at most "
                                    f"{lim.max_bytes}, got {total}")

    def _check_same(self, key: bytes, p: _Partial, c: dict, origin: tuple, where: str) -> None:
        """A later chunk must agree with the first one of its message, else both go."""
        if p.count != c["count"]:
            what, want, got = "count", p.count, c["count"]
        elif p.sha256 != bytes.fromhex(c["sha256"]):
            what, want, got = "sha256", p.sha256.hex(), c["sha256"]
        elif p.origin != _digest(*map(str, origin)):
            what, want, got = "job/round/device/codec", "those", origin
        else:
            return
        self._close(key)
        raise WireError(f"{where}: {what}: expected {want!r} (as in its first chunk), "
                        f"got {short(got)}")

    def _close(self, key: bytes) -> None:
        """Forget a held message and remember its key against redeliveries. (A key
        never held is not remembered: junk must not push out the ids that matter.)"""
        p = self._partials.pop(key, None)
        if p is None:
            return
        counts = self._by_sender[p.sender]
        counts[0] -= 1
        counts[1] -= p.charged
        self._held -= p.held
        self._charged -= p.charged
        self._by_topic[p.topic] -= 1
        if not self._by_topic[p.topic]:
            del self._by_topic[p.topic]
            self._release(counts, TOPIC_OVERHEAD)
        if not counts[0]:
            del self._by_sender[p.sender]
            self._release(counts, SENDER_OVERHEAD)
        self._closed[key] = self._clock()
        self._closed.move_to_end(key)
        if len(self._closed) > self.limits.max_closed:
            self._closed.popitem(last=False)

    def _release(self, counts: list[int], entry: int) -> None:
        counts[1] -= entry
        self._held -= entry
        self._charged -= entry

    def _drop_id_of(self, data: bytes | bytearray | memoryview, topic: str) -> None:
        """After a chunk fails to decode, drop its message if its header still names it."""
        try:
            chunk = peek_header(data).get("chunk")
        except WireError:
            return  # header unreadable: the message will simply time out
        if isinstance(chunk, dict) and isinstance(chunk.get("id"), str):
            with self._lock:
                self._close(_digest(topic, chunk["id"]))
