"""In-memory transport: a broker in the process, for fast simulations.

It carries the very same payloads (frames, chunks, JSON) as MQTT, so reported
traffic is real; only the sockets are missing. One dispatcher thread delivers
messages in publish order, as a broker connection would.
"""
from __future__ import annotations

import queue
import threading

from device_runtime.transport.base import DEFAULT_MAX_PAYLOAD, Transport, topic_matches


class MemoryHub:
    """The in-process broker: subscriptions, retained messages, ordered delivery."""

    def __init__(self):
        self._subs: dict[str, list[tuple[str, "MemoryTransport"]]] = {}
        self._retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="memory-hub", daemon=True)
        self._thread.start()

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        if retain:
            with self._lock:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
        self._queue.put((topic, payload))

    def subscribe(self, client: "MemoryTransport", pattern: str) -> None:
        with self._lock:
            self._subs.setdefault(client.client_id, [])
            if (pattern, client) not in self._subs[client.client_id]:
                self._subs[client.client_id].append((pattern, client))
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(pattern, t)]
        for t, p in retained:
            self._queue.put((t, p, client))

    def unsubscribe(self, client: "MemoryTransport", pattern: str) -> None:
        with self._lock:
            self._subs[client.client_id] = [
                s for s in self._subs.get(client.client_id, []) if s[0] != pattern]

    def disconnect(self, client: "MemoryTransport") -> None:
        with self._lock:
            self._subs.pop(client.client_id, None)

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued message has been delivered."""
        done = threading.Event()
        self._queue.put(done)
        done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
                continue
            if len(item) == 3:  # retained message for one new subscriber
                topic, payload, client = item
                client._deliver(topic, payload)
                continue
            topic, payload = item
            with self._lock:
                targets = {id(c): c for subs in self._subs.values() for p, c in subs
                           if topic_matches(p, topic)}
            for client in targets.values():
                try:
                    client._deliver(topic, payload)
                except Exception:  # a handler's bug must not stop the broker
                    client.on_error(topic, "handler raised")


class MemoryTransport(Transport):
    def __init__(self, hub: MemoryHub, client_id: str, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 will: tuple[str, bytes] | None = None):
        super().__init__(client_id, max_payload)
        self.hub = hub
        self.will = will
        self.connected = False

    def connect(self, timeout: float = 10.0) -> None:
        self.connected = True
        self.on_connect()

    def close(self) -> None:
        self.hub.disconnect(self)
        self.connected = False

    def kill(self) -> None:
        """Drop the connection uncleanly: the broker publishes the last will."""
        self.close()
        if self.will:
            self.hub.publish(self.will[0], self.will[1], True)

    def _publish_raw(self, topic: str, payload: bytes, retain: bool) -> None:
        self.hub.publish(topic, payload, retain)

    def _subscribe_raw(self, pattern: str) -> None:
        self.hub.subscribe(self, pattern)

    def _unsubscribe_raw(self, pattern: str) -> None:
        self.hub.unsubscribe(self, pattern)
