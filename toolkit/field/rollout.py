"""``fedge rollout``: ship a new signed export version to a fleet in stages, over MQTT.

The driver checks the new export (its signature with the operator's key, its job,
every artifact's sha256), publishes its files as retained signed frames on
``release/<version>/...``, learns the fleet from the devices' signed statuses
(devices that run an export of the job and whose profile the export covers),
and sends a signed ``Rollout`` command to a canary subset (``--canary``, chosen
by a hash of the rollout id). Each device reports in its status. Once the canary
has reported (or ``--report-timeout`` passed) and ``--hold`` is over, the
canary's error rate (a failed install, or no report, is an error) and latency
(the median of new / previous per-sample latency the devices measured) are
judged: beyond ``--max-error-rate`` or ``--max-latency-ratio`` the canary is
told to roll back and the rollout stops; otherwise everyone else is told to
install. State lives in ``rollout_state.py``'s file, so a restarted ``fedge
rollout`` resumes where it was. Protocol: docs/protocol.md; how to: docs/operations.md.
"""
from __future__ import annotations

import hashlib
import math
import queue
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from device_runtime.transport.base import DEFAULT_MAX_PAYLOAD
from toolkit.errors import UsageError
from toolkit.field.rollout_state import FINAL, RolloutState, default_path, describe, report


@dataclass(frozen=True)
class RolloutJob:
    """One ``fedge rollout``: what to ship where, and the bounds of the canary."""
    manifest: Path
    job: str
    broker: str
    canary: float = 0.1  # the fraction of the fleet that goes first
    hold: float = 600.0  # seconds the canary runs before it is judged
    max_error_rate: float = 0.0  # the canary's failed share that still proceeds
    max_latency_ratio: float = 2.0  # median new / previous latency that still proceeds
    fleet_wait: float = 10.0  # seconds to collect the devices' statuses
    report_timeout: float = 120.0  # seconds for a stage's devices to report
    state: Path | None = None  # default $FEDGE_HOME/rollouts/<job>.json
    credentials: str | None = None
    signing_key: str | None = None
    registry: str | None = None
    max_payload: int = DEFAULT_MAX_PAYLOAD

    def __post_init__(self) -> None:
        if not 0.0 < self.canary <= 1.0:
            raise UsageError(f"--canary: expected a share in (0%, 100%], got {self.canary:.0%}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise UsageError(f"--max-error-rate: expected a rate in [0, 1], got "
                             f"{self.max_error_rate}")
        if not self.max_latency_ratio >= 1.0:
            raise UsageError(f"--max-latency-ratio: expected >= 1, got "
                             f"{self.max_latency_ratio}")
        for name in ("hold", "fleet_wait", "report_timeout"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')}: expected >= 0 seconds, got "
                                 f"{getattr(self, name)}")

    @property
    def state_path(self) -> Path:
        return self.state or default_path(self.job)


def parse_share(text: str) -> float:
    """``10%`` or ``0.1`` -> 0.1 (UsageError naming --canary otherwise)."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise UsageError(f"--canary: expected a share such as 10% or 0.1, got {text!r}") \
            from None


def parse_duration(flag: str, text: str) -> float:
    """``90``, ``90s``, ``10m``, ``1h`` -> seconds (UsageError naming ``flag``)."""
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError:
        raise UsageError(f"{flag}: expected a duration such as 90s, 10m or 1h, got "
                         f"{text!r}") from None


def check_export(job: RolloutJob, trust: str):
    """The new export, verified as a device would: signature, job, version, sha256."""
    from device_runtime.manifest import load_manifest
    from device_runtime.rollback import ExportPolicy, check_binding

    m = load_manifest(job.manifest, trust=trust)
    check_binding(m, ExportPolicy(job.job), ledger=False)
    m.verify_all()
    return m


def run_rollout(job: RolloutJob) -> int:
    """Run (or resume) the rollout to its end: 0 when everyone has it, 1 rolled back."""
    from device_runtime.credentials import key_paths, transport_kwargs
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.deploy.signing import default_key_path, public_key_path
    from toolkit.field.fleet_keys import server_trust

    key, = key_paths(job.credentials, {"signing_key": job.signing_key})
    key = key or str(default_key_path())
    trust = server_trust(job.job, None, key, job.registry, job.credentials)
    pub = public_key_path(key)
    if not pub.is_file():
        raise UsageError(f"--signing-key: expected its public key beside it, got none at {pub}")
    m = check_export(job, str(pub))
    raw = (m.root / "manifest.json").read_bytes()
    st = RolloutState.load(job.state_path)
    if st is not None and st.version == m.version and st.stage in FINAL:
        print(describe(st))
        return 0 if st.stage == "done" else 1
    if st is None or st.version != m.version:
        st = RolloutState(job.job, secrets.token_hex(6), m.version,
                          str(m.root / "manifest.json"), hashlib.sha256(raw).hexdigest())
    t = MqttTransport(job.broker, f"fedge-{job.job}-rollout", max_payload=job.max_payload,
                      **transport_kwargs(job.credentials))
    t.connect()
    try:
        return Driver(job, trust, t, st).run(m, raw)
    finally:
        t.close()


class Driver:
    def __init__(self, job: RolloutJob, trust, transport, st: RolloutState):
        from device_runtime.topics import Topics

        self.job, self.trust, self.t, self.st = job, trust, transport, st
        self.topics = Topics(job.job)
        self.events: queue.Queue = queue.Queue()
        self.statuses: dict = {}  # device -> its newest Status
        transport.signer = trust.signer

    def run(self, m, raw: bytes) -> int:
        self.t.subscribe(self.topics.status(), lambda t, p: self.events.put((t, p)))
        self._publish_release(m, raw)
        if not self.st.canary and not self.st.rest:
            self._choose(m)
        while self.st.stage not in FINAL:
            self._step()
            self._save()
        print(describe(self.st))
        return 0 if self.st.stage == "done" else 1

    def _publish_release(self, m, raw: bytes) -> None:
        import numpy as np

        from device_runtime import wire
        from device_runtime.signing import signature_path

        def frame(tensors: dict) -> bytes:
            return self.trust.frame(wire.Frame("release", self.job.job, m.version, "server",
                                               "raw", tensors))
        sig = signature_path(m.root / "manifest.json").read_bytes()
        self.t.publish(self.topics.release(m.version, "manifest"), frame(
            {"manifest": np.frombuffer(raw, np.uint8), "sig": np.frombuffer(sig, np.uint8)}),
            retain=True)
        sent = set()
        for entry in m.devices.values():
            for a in entry.artifacts:
                if a.sha256 not in sent:
                    sent.add(a.sha256)
                    data = np.frombuffer(m.read_verified(a), np.uint8)
                    self.t.publish(self.topics.release(m.version, a.sha256),
                                   frame({"data": data}), retain=True)

    def _choose(self, m) -> None:
        """The fleet (online, running an export, a profile the export covers) and its
        canary: ceil(share x fleet) devices, by a hash of the rollout id."""
        self._pump_for(self.job.fleet_wait)
        fleet = sorted(d for d, s in self.statuses.items() if s.state != "offline"
                       and s.versions.get("artifact_version") and s.profile in m.devices)
        if not fleet:
            raise UsageError(f"--job {self.job.job}: no device online runs an export of "
                             f"the job with a profile in {self.job.manifest} (waited "
                             f"{self.job.fleet_wait:g}s)")
        n = max(1, math.ceil(self.job.canary * len(fleet)))
        order = sorted(fleet, key=lambda d: hashlib.sha256(
            f"{self.st.rollout}/{d}".encode()).hexdigest())
        self.st.canary, self.st.rest = sorted(order[:n]), sorted(order[n:])
        self.st.previous = {d: int(self.statuses[d].versions["artifact_version"])
                            for d in fleet}
        self.st.enter("canary", f"{n} of {len(fleet)} devices")
        self._save()

    def _step(self) -> None:
        st = self.st
        if st.stage == "canary":
            self._stage(st.canary, "install", "canary")
            if not st.hold_from:
                st.hold_from = time.time()
                self._save()
            # From the stored start: a restart continues the hold (with its own --hold).
            self._pump_for(st.hold_from + self.job.hold - time.time())
            why = self._judge(st.canary)
            if why:
                st.reason = why
                st.enter("rolling-back", why)
            else:
                st.enter("all", f"canary healthy; {len(st.rest)} devices to go")
        elif st.stage == "all":
            self._stage(st.rest, "install", "all")
            failed = [d for d in st.rest if not st.devices.get(d, {}).get("ok")]
            st.enter("done", f"{len(failed)} of {len(st.rest)} failed: {', '.join(failed)}"
                     if failed else "every device has it")
        elif st.stage == "rolling-back":
            self._stage(st.canary, "rollback", "rollback")
            st.enter("rolled-back", st.reason)

    def _stage(self, devices: list[str], action: str, key: str) -> None:
        """Command ``devices`` (the same ``issued`` after a restart) and wait for their
        reports of this action, up to --report-timeout."""
        from device_runtime import messages

        st = self.st
        issued = st.issued.setdefault(key, round(time.time(), 3))
        self._save()
        for d in devices:
            version = st.version if action == "install" else st.previous[d]
            cmd = messages.Rollout(rollout=st.rollout, action=action, version=version,
                                   replaces=st.previous[d] if action == "install"
                                   else st.version, manifest_sha256=st.manifest_sha256,
                                   issued=issued)
            self.t.publish(self.topics.rollout(d), self.trust.seal(
                cmd, round_=version, nonce=st.rollout, to=d), retain=True)
        deadline = time.time() + self.job.report_timeout
        while time.time() < deadline and not all(
                st.devices.get(d, {}).get("action") == action for d in devices):
            self._pump_for(0.2)

    def _judge(self, devices: list[str]) -> str:
        """Why the canary fails (empty: it passes)."""
        reports = [self.st.devices.get(d, {}) for d in devices]
        gone = {d for d in devices if getattr(self.statuses.get(d), "state", "") == "offline"}
        for d in gone:  # went offline during the hold: an error too
            self.st.devices.setdefault(d, {})["error"] = "offline after the install"
        bad = [d for d, r in zip(devices, reports)
               if d in gone or not (r.get("ok") and r.get("action") == "install")]
        rate = len(bad) / len(devices)
        if rate > self.job.max_error_rate:
            errors = "; ".join(f"{d}: {self.st.devices.get(d, {}).get('error') or 'no report'}"
                               for d in bad)
            return (f"canary error rate {rate:.0%} > {self.job.max_error_rate:.0%} "
                    f"({errors})")[:400]
        ratios = [r["latency_ms"] / r["previous_latency_ms"] for r in reports
                  if r.get("ok") and r.get("previous_latency_ms")]
        if ratios and statistics.median(ratios) > self.job.max_latency_ratio:
            return (f"canary latency {statistics.median(ratios):.2f}x the previous "
                    f"version's > {self.job.max_latency_ratio:g}x")
        return ""

    def _save(self) -> None:
        """The state file, then the same news for watchers: a signed retained report."""
        self.st.save(self.job.state_path)
        self.t.publish(self.topics.rollouts, self.trust.seal(
            report(self.st, self.job.hold), round_=self.st.version, nonce=self.st.rollout),
            retain=True)

    def _pump_for(self, seconds: float) -> None:
        end = time.time() + max(0.0, seconds)
        while True:
            try:
                topic, payload = self.events.get(timeout=max(0.0, min(0.2, end - time.time())))
                if self._on_status(topic, payload) and self.st.stage not in FINAL:
                    self._save()  # a device's report: the state file and the watchers
            except queue.Empty:
                pass
            if time.time() >= end:
                return

    def _on_status(self, topic: str, payload: bytes) -> bool:
        """Take a status; True if it is a new report of this rollout."""
        from device_runtime.errors import FedgeError

        where = self.topics.parse(topic)
        try:
            s = self.trust.status(where.get("device", ""), payload)
        except FedgeError as e:
            print(f"refused status on {topic}: {e}", flush=True)
            return False
        self.statuses[s.device] = s
        rep = s.versions.get("rollout")
        if isinstance(rep, dict) and rep.get("id") == self.st.rollout:
            was, now = self.st.devices.get(s.device, {}), round(time.time(), 3)
            same = was.get("action") == rep.get("action") and was.get("ok") == rep.get("ok")
            self.st.devices[s.device] = {
                # This host's clock (a device's may be off): when the result first came.
                "since": was.get("since", now) if same else now,
                "action": rep.get("action"), "ok": bool(rep.get("ok")),
                "artifact_version": s.versions.get("artifact_version"),
                "latency_ms": rep.get("latency_ms"),
                "previous_latency_ms": rep.get("previous_latency_ms"),
                "error": rep.get("error", ""), "time": now}
            if same:  # the same result again (a re-sent command): keep what was measured
                for k in ("latency_ms", "previous_latency_ms"):
                    self.st.devices[s.device][k] = was.get(k)
            return not same
        return False
