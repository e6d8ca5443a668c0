"""Chunking: frames above a broker's payload limit, cut into chunk frames and put back.

A chunk is itself a frame (kind ``"chunk"``) with one uint8 tensor ``"data"``
holding a slice of the original frame's bytes, the original's job, round,
device and codec, and ``chunk = {id, index, count, sha256}`` where ``sha256`` is
that of the whole original frame. Every chunk therefore passes the full frame
decoder (its own body sha256 included) before ``Reassembler`` keeps it, and the
reassembled bytes are checked against ``chunk.sha256`` before they are returned.
Both names are importable from ``device_runtime.wire``.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import numpy as np

from device_runtime.errors import WireError
from device_runtime.wire import Expect, Frame, decode, encode, peek_header

if TYPE_CHECKING:
    from device_runtime.keys import Signer


def split(data: bytes, max_payload: int, chunk_id: str, signer: Signer | None = None
          ) -> list[bytes]:
    """``[data]`` if it fits in ``max_payload`` bytes, else chunk frames that each fit,
    signed by ``signer`` (with the frame's nonce and addressee) if given, so a receiver
    can refuse a forged chunk before it holds it."""
    if len(data) <= max_payload:
        return [data]
    head = peek_header(data)
    digest = hashlib.sha256(data).hexdigest()
    auth = head.get("auth", {}) if signer else {}

    def chunk(index: int, count: int, payload: np.ndarray) -> bytes:
        return encode(Frame("chunk", head["job"], head["round"], head["device"], head["codec"],
                            {"data": payload},
                            chunk={"id": chunk_id, "index": index, "count": count,
                                   "sha256": digest},
                            nonce=auth.get("nonce", ""), to=auth.get("to", "")), signer=signer)

    # The header of chunk 0 of 1 with an empty slice, plus room for the widest
    # index, count, shape and nbytes any chunk can have: an upper bound for all.
    overhead = (len(chunk(0, 1, np.empty(0, np.uint8)))
                + 2 * len(str(len(data))) + 2 * len(str(max_payload)))
    step = max_payload - overhead
    if step < 1:
        raise WireError(f"max_payload: expected more than {overhead} bytes (a chunk's own "
                        f"header), got {max_payload}")
    count = math.ceil(len(data) / step)
    return [chunk(i, count, np.frombuffer(data, np.uint8, min(step, len(data) - i * step),
                                          i * step))
            for i in range(count)]


@dataclass
class _Partial:
    """The chunks of one message received so far."""

    count: int
    sha256: str
    origin: tuple  # (job, round, device, codec) of the first chunk
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    nbytes: int = 0


class Reassembler:
    """Collects chunk frames and returns each original frame once it is complete.

    A message whose chunks disagree (count, index, sha256, origin, or two
    different payloads for one index) is dropped as a whole, and so is one that
    fails the final sha256 check or would push the pending bytes past
    ``max_pending_bytes``. Ids that completed or were dropped are remembered for
    ``timeout_s``, so a QoS 1 redelivery of one of their chunks is ignored rather
    than starting a message that can never complete. Thread-safe.
    """

    def __init__(self, timeout_s: float = 60.0, max_pending_bytes: int = 256 * 1024 * 1024,
                 clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.max_pending_bytes = max_pending_bytes
        self._clock = clock
        self._partials: dict[str, _Partial] = {}
        self._closed: dict[str, float] = {}  # id -> when it completed or was dropped
        self._lock = threading.Lock()

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return sum(p.nbytes for p in self._partials.values())

    def add(self, chunk: bytes | Frame) -> bytes | None:
        """The original frame's bytes once its last chunk arrived, else None."""
        # A Frame is checked exactly like received bytes: by the decoder.
        data = encode(chunk) if isinstance(chunk, Frame) else chunk
        try:
            frame = decode(data, Expect(kind="chunk"))
        except WireError:
            self._drop_id_of(data)
            raise
        if frame.chunk is None:
            raise WireError("header.chunk: expected an object in a chunk frame, got nothing")
        names = list(frame.tensors)
        if names != ["data"] or frame.tensors["data"].dtype != np.uint8 \
                or frame.tensors["data"].ndim != 1:
            got = [f"{n}: {a.dtype}{list(a.shape)}" for n, a in frame.tensors.items()]
            raise WireError(f"header.tensors: expected one 1-d uint8 tensor 'data' in a chunk "
                            f"frame, got {got}")
        with self._lock:
            return self._add(frame, frame.tensors["data"].tobytes())

    def expire(self) -> list[str]:
        """Drop the messages whose first chunk is older than ``timeout_s``; their ids."""
        now = self._clock()
        with self._lock:
            old = [cid for cid, p in self._partials.items() if now - p.started > self.timeout_s]
            for cid in old:
                self._close(cid)
            self._closed = {cid: t for cid, t in self._closed.items()
                            if now - t <= self.timeout_s}
        return old

    def _add(self, frame: Frame, payload: bytes) -> bytes | None:
        c = frame.chunk
        cid, index = c["id"], c["index"]
        if cid in self._closed:
            return None
        origin = (frame.job, frame.round, frame.device, frame.codec)
        p = self._partials.setdefault(cid, _Partial(c["count"], c["sha256"], origin,
                                                    self._clock()))
        for what, want, got in (("count", p.count, c["count"]),
                                ("sha256", p.sha256, c["sha256"]),
                                ("job/round/device/codec", p.origin, origin)):
            if want != got:
                self._close(cid)
                raise WireError(f"chunk {cid!r} index {index}: {what}: expected {want!r} "
                                f"(as in its first chunk), got {got!r}")
        if index in p.parts:
            if p.parts[index] == payload:
                return None  # a redelivery
            self._close(cid)
            raise WireError(f"chunk {cid!r} index {index}: expected the same bytes as its first "
                            f"copy, got different bytes")
        pending = sum(q.nbytes for q in self._partials.values())
        if pending + len(payload) > self.max_pending_bytes:
            self._close(cid)
            raise WireError(f"pending chunk bytes: expected at most {self.max_pending_bytes}, "
                            f"got {pending + len(payload)} with chunk {cid!r} index {index}")
        p.parts[index] = payload
        p.nbytes += len(payload)
        if len(p.parts) < p.count:
            return None
        self._close(cid)
        whole = b"".join(p.parts[i] for i in range(p.count))
        digest = hashlib.sha256(whole).hexdigest()
        if digest != p.sha256:
            raise WireError(f"chunk {cid!r}: sha256 of the reassembled frame: expected "
                            f"{p.sha256[:16]}..., got {digest[:16]}...")
        return whole

    def _close(self, cid: str) -> None:
        self._partials.pop(cid, None)
        self._closed[cid] = self._clock()

    def _drop_id_of(self, data: bytes | bytearray | memoryview) -> None:
        """After a chunk fails to decode, drop its message if its header still names it."""
        try:
            chunk = peek_header(data).get("chunk")
        except WireError:
            return  # header unreadable: the message will simply time out
        if chunk is not None:
            with self._lock:
                self._close(chunk["id"])
