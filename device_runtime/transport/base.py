"""The transport interface: topics in, bytes out, the same for MQTT and in-memory.

A transport carries opaque payloads (wire frames or small JSON documents) with
QoS 1 semantics. Frames above ``max_payload`` are split into chunk frames on
sub-topics ``<topic>/_c/<index>`` (distinct topics, so retained chunks do not
overwrite one another) and reassembled before the handler sees them; a
subscription to ``pattern`` therefore also covers ``pattern/_c/+``.

A persistent session's queued messages arrive right after the (re)connect, often
before the client has subscribed its handlers again (a restarted aggregator loads
its state first): a message no handler matches is kept (up to ``EARLY_BYTES``)
and handed to the first handler subscribed for it, instead of being dropped.
"""
from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from device_runtime import wire
from device_runtime.chunk_split import split
from device_runtime.chunking import Reassembler, ReassemblyLimits
from device_runtime.errors import WireError

if TYPE_CHECKING:
    from device_runtime.keys import Signer

# Bytes per MQTT message unless told otherwise: any broker takes 128 KiB (AWS IoT Core no
# more); fedge secure init's credentials carry what its Mosquitto takes (credentials.py).
DEFAULT_MAX_PAYLOAD = 128 * 1024

Handler = Callable[[str, bytes], None]
CHUNK_SEP = "/_c/"
SHARE = "$share/"  # MQTT v5 shared subscriptions: $share/<group>/<filter>
EARLY_BYTES = 32 << 20  # unclaimed messages kept for a handler still to subscribe
RECONNECTED = "\0reconnected"  # an event a client queues on (re)connect, never a topic


@dataclass
class TrafficStats:
    """Bytes and messages actually handed to / received from the broker."""

    sent_bytes: int = 0
    sent_messages: int = 0
    received_bytes: int = 0
    received_messages: int = 0
    by_topic_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def count_sent(self, topic: str, n: int) -> None:
        self.sent_bytes += n
        self.sent_messages += 1
        self.by_topic_kind[topic_kind(topic)] += n

    def count_received(self, n: int) -> None:
        self.received_bytes += n
        self.received_messages += 1


def topic_kind(topic: str) -> str:
    """The role of a fedge topic (``update``, ``model``, ``task``, ``status``, ...)."""
    parts = topic.split(CHUNK_SEP)[0].split("/")
    for kind in ("update", "model", "task", "status", "plan", "control"):
        if kind in parts:
            return kind
    return parts[-1] if parts else ""


def _with_chunks(pattern: str) -> list[str]:
    """``pattern`` and its chunks' sub-topics ('#' already covers them)."""
    return [pattern] if pattern.endswith("#") else [pattern, pattern + CHUNK_SEP + "+"]


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT topic filter matching (``+`` one level, ``#`` the rest). A shared
    subscription (``$share/<group>/<filter>``) matches as its filter does."""
    if pattern.startswith(SHARE):
        pattern = pattern.split("/", 2)[2] if pattern.count("/") >= 2 else ""
    p, t = pattern.split("/"), topic.split("/")
    for i, part in enumerate(p):
        if part == "#":
            return True
        if i >= len(t) or (part != "+" and part != t[i]):
            return False
    return len(p) == len(t)


class Transport(ABC):
    """Publish/subscribe with chunking; subclasses move the bytes."""

    def __init__(self, client_id: str, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 reassembly_timeout: float = 60.0):
        self.client_id = client_id
        self.max_payload = max_payload
        self.stats = TrafficStats()
        self._handlers: dict[str, Handler] = {}
        self._reassembler = Reassembler(ReassemblyLimits(ttl=reassembly_timeout))
        self._lock = threading.Lock()
        self._early: list[tuple[str, bytes]] = []  # arrived before any handler matched
        self._early_bytes = 0
        self.on_error: Callable[[str, str], None] = lambda topic, why: None
        # Called after every (re)connect, on the transport's thread: a device
        # re-announces itself so the aggregator resends its task.
        self.on_connect: Callable[[], None] = lambda: None
        # Signs the chunks of a signed frame (the owner's key), so receivers can check
        # each chunk before holding it (chunk_auth.py: a live message's chunk 0 only).
        self.signer: Signer | None = None
        # The receiver's check of every chunk and every whole message, on the delivery
        # thread, before anything is held or queued: raises WireError to refuse it. For
        # a chunk it may return the header it validated (wire.peek_header's), which the
        # reassembler then need not parse again.
        self.gate: Callable[[str, bytes, bool], dict | None] | None = None

    # --- what subclasses provide -------------------------------------------
    @abstractmethod
    def connect(self, timeout: float = 10.0) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def _publish_raw(self, topic: str, payload: bytes, retain: bool) -> None: ...

    @abstractmethod
    def _subscribe_raw(self, pattern: str) -> None: ...

    @abstractmethod
    def _unsubscribe_raw(self, pattern: str) -> None: ...

    def _subscribe_many(self, patterns: list[str]) -> None:
        """Subscribe to each of ``patterns``; a subclass may send them in one request."""
        for p in patterns:
            self._subscribe_raw(p)

    def _unsubscribe_many(self, patterns: list[str]) -> None:
        for p in patterns:
            self._unsubscribe_raw(p)

    # --- the interface ---------------------------------------------------------
    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """Send ``payload`` (chunked if needed); returns bytes put on the wire."""
        parts = [payload]
        if len(payload) > self.max_payload and payload[:4] == wire.MAGIC:
            # Live chunks arrive in order, after their chunk 0: signing it is enough.
            parts = split(payload, self.max_payload, uuid.uuid4().hex[:16], self.signer,
                          sign_all=retain)
        total = 0
        for i, part in enumerate(parts):
            t = topic if len(parts) == 1 else f"{topic}{CHUNK_SEP}{i}"
            self._publish_raw(t, part, retain)
            self.stats.count_sent(t, len(part))
            total += len(part)
        return total

    def clear_retained(self, topic: str, chunks: int = 0) -> None:
        """Delete a retained message (and its retained chunks) from the broker."""
        self._publish_raw(topic, b"", True)
        for i in range(chunks):
            self._publish_raw(f"{topic}{CHUNK_SEP}{i}", b"", True)

    def subscribe(self, pattern: str, handler: Handler) -> None:
        with self._lock:
            self._handlers[pattern] = handler
            early = [(t, p) for t, p in self._early if topic_matches(pattern, t)]
            if early:
                self._early = [(t, p) for t, p in self._early if not topic_matches(pattern, t)]
                self._early_bytes = sum(len(p) for _, p in self._early)
        for t, p in early:  # oldest first, as the broker sent them
            handler(t, p)
        self._subscribe_many(_with_chunks(pattern))

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        """Wait until the broker granted every subscription so far; a transport that
        subscribes synchronously has nothing to wait for."""
        return True

    def unsubscribe(self, pattern: str) -> None:
        with self._lock:
            self._handlers.pop(pattern, None)
        self._unsubscribe_many(_with_chunks(pattern))

    def _deliver(self, topic: str, payload: bytes) -> None:
        """Called by subclasses for every message received, on their delivery thread."""
        self.stats.count_received(len(payload))
        if not payload:  # a cleared retained message
            return
        if CHUNK_SEP in topic:
            topic = topic.split(CHUNK_SEP)[0]
            try:
                header = self.gate(topic, payload, True) if self.gate is not None else None
                whole = self._reassembler.add(payload, topic, header)  # expires the old too
            except WireError as e:
                self.on_error(topic, f"chunk rejected: {e}")
                return
            if whole is None:
                return
            payload = whole
        if self.gate is not None:
            try:
                self.gate(topic, payload, False)
            except WireError as e:
                self.on_error(topic, f"refused: {e}")
                return
        with self._lock:
            handlers = [h for p, h in self._handlers.items() if topic_matches(p, topic)]
            if not handlers:
                self._keep_early(topic, payload)
        for h in handlers:
            h(topic, payload)

    def _keep_early(self, topic: str, payload: bytes) -> None:
        """Keep a message no handler wants yet (called under the lock); the oldest go
        first when the kept bytes pass EARLY_BYTES."""
        self._early.append((topic, payload))
        self._early_bytes += len(payload)
        while self._early_bytes > EARLY_BYTES and self._early:
            self._early_bytes -= len(self._early.pop(0)[1])
