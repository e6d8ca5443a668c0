"""What the dashboard knows of a job: the fleet, the rounds, the refusals.

Fed from the MQTT thread (``take``), read by the web server's threads (``changes``,
``snapshot``), hence one lock. Every message is checked as the aggregator checks it
(docs/protocol.md): a status must be signed by its device's key in the fleet registry
and be no older than the last one taken (the signed will "offline" excepted); the plan,
the round summary and the rollout report must be signed by the aggregator's key for
this job (the operator's, for ``fedge rollout``), no older than the last. The broker
is not trusted, so what passes is still data: each field the page shows is checked
for type and size (``clean.py``) and anything else is counted as refused, never shown.

A change bumps ``version``; each device row and the timeline carry the version they
last changed at, so a page that has seen version v is sent only what changed since.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from device_runtime import messages
from device_runtime.errors import FedgeError
from device_runtime.keys import PublicKey, RegistryFile
from device_runtime.topics import Topics
from toolkit.field.dashboard import clean

log = logging.getLogger("fedge.dashboard")
SERVER = "server"  # the sender id of the aggregator's messages (broker_server.trust)
MAX_PROFILE_POINTS = 2000  # per-profile series kept (rounds)


@dataclass
class DeviceRow:
    device: str
    status: dict  # clean.status(...): the fields the table shows
    ts: float  # the newest non-offline status's own time (replay check)
    seen: float  # last seen: its newest status, or the last round it reported in
    version: int = 0


@dataclass
class JobState:
    plan: dict = field(default_factory=dict)
    summary: dict = field(default_factory=dict)  # the newest round summary, cleaned
    timeline: dict[int, list] = field(default_factory=dict)  # round -> history row
    profiles: dict[str, dict[int, dict]] = field(default_factory=dict)  # name -> round -> figs
    rollout: dict = field(default_factory=dict)  # the newest rollout report, cleaned
    version: int = 0
    closed_seen: dict[int, float] = field(default_factory=dict)  # round -> when shown here


class FleetView:
    """The dashboard's state; ``take(topic, payload)`` is the MQTT handler."""

    def __init__(self, job: str, server_key: PublicKey, registry: RegistryFile):
        self.topics = Topics(job)
        self.job, self.server_key, self.registry = job, server_key, registry
        self.devices: dict[str, DeviceRow] = {}
        self.state = JobState()
        self.refused: dict[str, int] = {}  # reason -> count
        self.version = 0
        self.received = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    # --- the MQTT side ----------------------------------------------------------------
    def take(self, topic: str, payload: bytes) -> None:
        where = self.topics.parse(topic)
        try:
            if where["kind"] == "status":
                self._status(where["device"], payload)
            elif where["kind"] == "summary":
                self._summary(payload)
            elif where["kind"] == "plan":
                self._plan(payload)
            elif where["kind"] == "rollouts":
                self._rollout(payload)
        except (FedgeError, clean.Invalid) as e:
            self.refuse(where.get("kind", "?"), e)
        except Exception as e:  # a bug on one message must not stop the feed
            log.exception("unexpected error on %s", topic)
            self.refuse(where.get("kind", "?"), e)

    def refuse(self, kind: str, e: Exception) -> None:
        reason = f"{kind}: {str(e).split(':')[0][:80]}"
        with self._lock:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            n = self.refused[reason]
            self._bump()
        if n == 1 or n % 1000 == 0:
            log.warning("refused %s (#%d of its kind): %s", kind, n, e)

    def _bump(self) -> int:
        self.version += 1
        self._changed.notify_all()
        return self.version

    def _device_key(self, device: str) -> PublicKey:
        key = self.registry.get(device)
        if key is None and self.registry.refresh():  # e.g. fedge secure add since
            key = self.registry.get(device)
        if key is None:
            raise clean.Invalid(f"device: no key for {device!r} in the registry")
        return key

    def _status(self, device: str, payload: bytes) -> None:
        status = messages.unseal(messages.Status, payload, self._device_key(device),
                                 self.job, sender=device).msg
        if status.device != device:
            raise clean.Invalid(f"status.device: expected {device!r}, got {status.device!r}")
        row = clean.status(status)
        now = time.time()
        with self._lock:
            old = self.devices.get(device)
            if old is not None and status.state != "offline" and status.ts < old.ts:
                raise clean.Invalid(f"status.ts: older than the last taken ({status.ts:.3f})")
            if old is not None and status.state == "offline":
                # The will carries only the state: keep what the device said before.
                row = {**old.status, "state": "offline", "error": old.status["error"]}
            ts = status.ts if status.state != "offline" or old is None else old.ts
            seen = max(ts, old.seen if old else 0.0) if status.state != "offline" else \
                (old.seen if old else 0.0)
            self.devices[device] = DeviceRow(device, row, ts, min(seen, now), self._bump())

    def _summary(self, payload: bytes) -> None:
        sealed = messages.unseal(messages.Summary, payload, self.server_key, self.job,
                                 sender=SERVER)
        s = clean.summary(sealed.msg)
        with self._lock:
            st = self.state
            if st.summary and s["closed"] < st.summary["closed"]:
                raise clean.Invalid("summary.closed: older than the last taken (replayed)")
            st.summary = s
            for row in s["history"]:
                st.timeline.setdefault(row[0], row)
            st.timeline[s["round"]] = s["row"]
            for name, figs in s["profiles"].items():
                series = st.profiles.setdefault(name, {})
                series[s["round"]] = figs
                while len(series) > MAX_PROFILE_POINTS:
                    series.pop(min(series))
            st.closed_seen[s["round"]] = time.time()
            # The rows of the devices that reported change too, but are not sent again:
            # the page applies the summary's ``reporting`` itself (a thousand rows less
            # per round on the wire); a page that connects later gets them with the rows.
            for d in s["reporting"]:
                row = self.devices.get(d)
                if row is not None:
                    row.seen = max(row.seen, s["closed"])
                    row.status = {**row.status, "round": s["round"]}
            st.version = self._bump()

    def _plan(self, payload: bytes) -> None:
        plan = messages.unseal(messages.Plan, payload, self.server_key, self.job,
                               sender=SERVER).msg
        with self._lock:
            if self.state.plan and plan.issued < self.state.plan["issued"]:
                raise clean.Invalid("plan.issued: older than the last taken")
            self.state.plan = clean.plan(plan)
            self.state.version = self._bump()

    def _rollout(self, payload: bytes) -> None:
        sealed = messages.unseal(messages.RolloutReport, payload, self.server_key, self.job,
                                 sender=SERVER)
        r = clean.rollout(sealed.msg)
        if sealed.frame.round != r["version"] or sealed.frame.nonce != r["rollout"]:
            raise clean.Invalid("rollout: the frame's round and nonce must be its version "
                                "and id")
        with self._lock:
            if self.state.rollout and r["updated"] < self.state.rollout["updated"]:
                raise clean.Invalid("rollout.updated: older than the last taken (replayed)")
            self.state.rollout = r
            self.state.version = self._bump()

    # --- the web side ---------------------------------------------------------------
    def wait(self, since: int, timeout: float) -> int:
        """The version, once it is past ``since`` or after ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(lambda: self.version > since, timeout)
            return self.version

    def changes(self, since: int) -> tuple[int, dict]:
        """(version, what changed after version ``since``): device rows, and the job's
        figures whole if they changed (0: everything)."""
        with self._lock:
            out: dict = {"job": self.job, "now": time.time(),
                         "refused": dict(self.refused),
                         "devices": [self._row(r) for r in self.devices.values()
                                     if r.version > since]}
            if self.state.version > since:
                st = self.state
                out.update(plan=st.plan, summary={k: v for k, v in st.summary.items()
                                                  if k not in ("history", "row")},
                           timeline=[st.timeline[r] for r in sorted(st.timeline)],
                           profiles={n: [[r, f] for r, f in sorted(s.items())]
                                     for n, s in st.profiles.items()},
                           rollout=st.rollout)
            return self.version, out

    @staticmethod
    def _row(r: DeviceRow) -> dict:
        return {"device": r.device, **r.status, "seen": r.seen}

    def counts(self) -> dict:
        """Devices by state, for /metrics."""
        with self._lock:
            out: dict[str, int] = {"online": 0, "offline": 0, "error": 0}
            for r in self.devices.values():
                out[r.status["state"]] = out.get(r.status["state"], 0) + 1
            return out

    def figures(self) -> tuple[dict, list, dict]:
        """(summary, timeline rows, refused by reason) for /metrics."""
        with self._lock:
            st = self.state
            return dict(st.summary), [st.timeline[r] for r in sorted(st.timeline)], \
                dict(self.refused)
