"""``fedge audit``'s session: its options and findings, and the raw connections to the
broker with what they have seen (the attacks themselves are in ``toolkit/field/audit.py``).
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime import messages, wire
from device_runtime.errors import FedgeError
from device_runtime.keys import Signer
from device_runtime.topics import Topics, check_id
from device_runtime.transport.base import CHUNK_SEP
from device_runtime.transport.mqtt import MqttTransport
from toolkit.errors import UsageError

REFUSED, HELD, NOT_REFUSED = "refused", "held", "NOT REFUSED"
NOT_OBSERVED = "not observed"  # this client cannot see the outcome (the broker's ACL)
FAR_ROUND = 10 ** 6  # a round no job reaches: forged tasks and the giant message go here
SENDER = "server"


@dataclass(frozen=True)
class AuditOptions:
    broker: str
    job: str
    credentials: str | None = None  # a client's credentials file (fedge secure init)
    seconds: float = 10.0  # how long each attack watches (and the flood lasts)
    json_out: Path | None = None
    progress_timeout: float = 120.0  # after the flood: wait this long for a new round
    giant_bytes: int = 64 << 20
    flood_rate: float = 500.0  # chunks per second
    settle: float = 2.0  # wait for retained messages after subscribing

    def __post_init__(self) -> None:
        check_id("job", self.job)
        for name in ("seconds", "progress_timeout", "flood_rate", "settle"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0:
                raise UsageError(f"--{name.replace('_', '-')}: expected a positive number, "
                                 f"got {value!r}")
        if self.giant_bytes < 1:
            raise UsageError(f"--giant-bytes: expected a positive number, got "
                             f"{self.giant_bytes!r}")


@dataclass
class Finding:
    attack: str
    verdict: str  # REFUSED | HELD | NOT_REFUSED | NOT_OBSERVED
    saw: str

    def line(self) -> str:
        return f"{self.attack:<14} {self.verdict:<12} {self.saw}"


class _Raw(MqttTransport):
    """A client that hands every message to ``sink`` as the broker sent it (no
    reassembly, no signature gate), with the broker's retain flag."""

    def __init__(self, url: str, client_id: str, sink: Callable[[str, bytes, bool], None],
                 **kwargs):
        super().__init__(url, client_id, max_payload=1 << 30, **kwargs)
        self._client.on_message = lambda c, u, m: sink(m.topic, m.payload, bool(m.retain))

    def watch(self, pattern: str) -> None:
        self._subscribe_raw(pattern)


@dataclass
class _Seen:
    """What the audit observed, under one lock (the network thread writes it)."""

    statuses: dict[str, messages.Status] = field(default_factory=dict)
    events: list[tuple[float, messages.Status]] = field(default_factory=list)
    retained: dict[str, bytes] = field(default_factory=dict)  # before any forgery
    capturing: bool = True
    model_rounds: dict[int, float] = field(default_factory=dict)  # round -> first seen
    updates: dict[int, int] = field(default_factory=dict)  # round -> messages


def read_status(payload: bytes) -> messages.Status | None:
    """A status as its frame says (signature not checked: audit has no device key)."""
    try:
        if payload[:4] != wire.MAGIC:
            return messages.parse(messages.Status, payload)
        frame = wire.decode(payload)
        return messages.parse(messages.Status, frame.tensors["msg"].tobytes())
    except (FedgeError, KeyError):
        return None


class Session:
    """The audit's connections to the broker and what they have seen."""

    def __init__(self, opts: AuditOptions):
        from device_runtime.credentials import transport_kwargs

        self.opts, self.topics = opts, Topics(opts.job)
        self.creds = transport_kwargs(opts.credentials)
        self.lock, self.seen = threading.Lock(), _Seen()
        self.stranger = Signer.generate()  # a key nobody trusts
        self.closed = False
        self.t = self.connect("audit", self._sink)
        for pattern in (self.topics.status(), self.topics.plan, self.topics.control,
                        self.topics.plan + CHUNK_SEP + "+", self.topics.model("+", "+"),
                        self.topics.model("+", "+") + CHUNK_SEP + "0",
                        self.topics.update(FAR_ROUND, "#")):
            self.t.watch(pattern)
        time.sleep(opts.settle)
        with self.lock:
            self.seen.capturing = False

    def connect(self, role: str, sink: Callable[[str, bytes, bool], None] = lambda *a: None,
                client_id: str | None = None, persistent: bool = False,
                timeout: float = 10.0) -> _Raw:
        t = _Raw(self.opts.broker, client_id or f"fedge-audit-{role}-{uuid.uuid4().hex[:8]}",
                 sink, persistent=persistent, **self.creds)
        t.connect(timeout)
        return t

    def _sink(self, topic: str, payload: bytes, retain: bool) -> None:
        where = self.topics.parse(topic.split(CHUNK_SEP)[0])
        now = time.time()
        with self.lock:
            if self.seen.capturing and retain and payload and \
                    where["kind"] in ("plan", "control"):
                self.seen.retained[topic] = payload
            if where["kind"] == "status" and (s := read_status(payload)) is not None:
                self.seen.statuses[where["device"]] = s
                self.seen.events.append((now, s))
            elif where["kind"] == "model" and where["round"] < FAR_ROUND:  # not our own
                self.seen.model_rounds.setdefault(where["round"], now)
            elif where["kind"] == "update" and payload:
                self.seen.updates[where["round"]] = self.seen.updates.get(where["round"], 0) + 1

    def online(self) -> list[str]:
        with self.lock:
            return sorted(d for d, s in self.seen.statuses.items() if s.state == "online")

    def last_round(self) -> int:
        with self.lock:
            return max(self.seen.model_rounds, default=0)

    def targets(self) -> list[str]:
        """The devices to aim at: those online, else the credentials' own user (under
        the ACL a device reads no status, and may publish only as itself)."""
        user = self.creds.get("username")
        return self.online() or ([user] if user else [])

    def wait_round(self, target: int) -> int:
        """The last round once it reaches ``target``, or after ``progress_timeout``."""
        deadline = time.time() + self.opts.progress_timeout
        while self.last_round() < target and time.time() < deadline:
            time.sleep(0.2)
        return self.last_round()

    def disturbed(self, devices: list[str], since: float) -> list[str]:
        """Devices of ``devices`` that reported anything but a clean "online" since then."""
        with self.lock:
            events = [s for t, s in self.seen.events if t >= since]
        return sorted({f"{s.device}: {s.state}{' (' + s.error[:80] + ')' if s.error else ''}"
                       for s in events if s.device in devices
                       and (s.state != "online" or s.error)})

    def restore(self, topic: str) -> None:
        """Put back what was retained on ``topic`` before the audit, or clear it."""
        with self.lock:
            before = self.seen.retained.get(topic)
        if before is None:
            self.t.clear_retained(topic)
        else:
            self.t.publish(topic, before, retain=True)
        self.t.flush()

    def close(self) -> None:
        """Close the watcher (again: a no-op)."""
        if not self.closed:
            self.closed = True
            self.t.close()
