"""``fedge audit``: issue 20's attacks, run as a hostile client against a live job.

An operator points it at their own broker and job (optionally with a client's
credentials, e.g. a leaked device's) and it tries, one by one, what an attacker
on the broker would: a forged stop, forged tasks and a forged plan naming a
network-chosen model factory, a chunk flood, a giant message and a client-id
takeover. Each attack reports ``refused``, ``held`` or ``NOT REFUSED`` with what
it saw, judged only by what any client can observe: the devices' retained
statuses (signed frames, read without checking the signature: audit has no
device key), the rounds' model topics and the update topics. The forged plan and
stop are retained messages: what was retained before is put back afterwards.
Forged messages name no planted code (the factory's repository does not exist),
so a job that is NOT protected fails loudly instead of running anything.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from device_runtime import messages, wire
from device_runtime.errors import FedgeError
from device_runtime.transport.base import CHUNK_SEP
from device_runtime.transport.url import TransportError
from toolkit.errors import UsageError
from toolkit.field.audit_session import (
    FAR_ROUND,
    HELD,
    NOT_OBSERVED,
    NOT_REFUSED,
    REFUSED,
    SENDER,
    AuditOptions,
    Finding,
    Session,
)


def _custom_model() -> dict:
    """The remote-code model config of issue 20, naming a repository that does not exist."""
    return {"arch": "custom", "input_shape": [40], "num_classes": 10,
            "factory": "torch.hub:load",
            "kwargs": {"repo_or_dir": "/nonexistent/fedge-audit", "model": "model",
                       "source": "local"}}


def _forged(s: Session, msg, round_: int = 0, to: str = "") -> list[bytes]:
    """``msg`` unsigned (the old JSON) and signed by a stranger's key."""
    return [messages.dump(msg),
            messages.seal(msg, s.opts.job, SENDER, s.stranger, round_, "audit", to)]


def _kept_going(s: Session, name: str, devices: list[str], since: float, r0: int,
                saw: str = "", verdict: str = REFUSED) -> Finding:
    """The job kept going: two new rounds after round ``r0`` (a device that stopped
    cannot have trained the second: its task came after the attack), and no device
    that was online reported anything else since ``since``. A device that stops cleanly
    leaves its "online" status retained, so progress is the test that sees it; a client
    the ACL does not let read statuses (a device's) is judged by progress alone."""
    r1 = s.wait_round(r0 + 2)
    saw = f"{saw}{'; ' if saw else ''}rounds {r0} -> {r1}"
    if r1 < r0 + 2:
        return Finding(name, NOT_REFUSED, f"{saw}: the job did not go on within "
                       f"{s.opts.progress_timeout:g}s (devices stopped or stuck?)")
    hit = s.disturbed(devices, since)
    if hit:
        return Finding(name, NOT_REFUSED, f"{saw}; " + "; ".join(hit))
    devices = [d for d in devices if d in s.online()]
    if not devices:
        return Finding(name, verdict, f"{saw}; no device status readable by this client "
                       "(judged by progress alone)")
    return Finding(name, verdict, f"{saw}; {len(devices)} online devices stayed online")


def _round_after_delivery(s: Session) -> int:
    """The last round, once what the broker had before our messages has reached us."""
    s.t.flush()
    time.sleep(0.5)
    return s.last_round()


def _forge_retained(s: Session, name: str, topic: str, msg) -> Finding:
    """``msg`` retained on ``topic`` (unsigned, then stranger-signed) for ``seconds``;
    what was retained there before is put back whatever happens."""
    devices, start = s.online(), time.time()
    try:
        for payload in _forged(s, msg):
            s.t.publish(topic, payload, retain=True)
        r0 = _round_after_delivery(s)
        time.sleep(s.opts.seconds)
    finally:
        s.restore(topic)
    return _kept_going(s, name, devices, start, r0)


def forged_stop(s: Session) -> Finding:
    return _forge_retained(s, "forged-stop", s.topics.control,
                           messages.Control("stop", "fedge audit"))


def forged_task(s: Session) -> Finding:
    """To each online device, a task naming the custom factory, with the retained
    model frame it names (by the frame's sha256, as unsigned fleets checked it)."""
    devices, start = s.targets(), time.time()
    model_topic = s.topics.model(FAR_ROUND, "full")
    model = wire.encode(wire.Frame("model", s.opts.job, FAR_ROUND, SENDER))
    s.t.publish(model_topic, model, retain=True)
    try:
        for device in devices:
            task = messages.Task(round=FAR_ROUND, device=device, variant="full",
                                 model_sha256=hashlib.sha256(model).hexdigest(),
                                 deadline=time.time() + 60, epochs=1, batch_size=8, lr=0.1,
                                 seed=0, codec="fp32", model=_custom_model(), nonce="audit")
            for payload in _forged(s, task, FAR_ROUND, device):
                s.t.publish(s.topics.task(FAR_ROUND, device), payload)
        r0 = _round_after_delivery(s)
        time.sleep(s.opts.seconds)
    finally:
        s.t.clear_retained(model_topic)
    with s.lock:
        updates = s.seen.updates.get(FAR_ROUND, 0)
    if updates:
        return Finding("forged-task", NOT_REFUSED, f"{updates} updates for forged round "
                       f"{FAR_ROUND}")
    return _kept_going(s, "forged-task", devices, start, r0,
                       f"no update for round {FAR_ROUND}")


def forged_plan(s: Session) -> Finding:
    # The newest plan wins on a device: this one claims to be from the far future.
    plan = messages.Plan(s.opts.job, "fedavg", "fp32", 3, _custom_model(), 1, 30.0,
                         session="audit", issued=time.time() + 10 ** 6)
    return _forge_retained(s, "forged-plan", s.topics.plan, plan)


def _flood_chunks(s: Session, devices: list[str], round_: int, n: int) -> list[tuple]:
    """``n`` (topic, chunk) pairs: chunk 0 of 2 of distinct messages that never finish,
    signed by a stranger and claiming to come from the devices: what made the old
    reassembler hold ever more and scan it all on every chunk."""
    data = np.zeros(512, np.uint8)
    out = []
    for i in range(n):
        device = devices[i % len(devices)]
        chunk = {"id": uuid.uuid4().hex[:16], "index": 0, "count": 2,
                 "sha256": uuid.uuid4().hex * 2}
        frame = wire.Frame("chunk", s.opts.job, round_, device, "fp32", {"data": data},
                           chunk=chunk, nonce="audit")
        out.append((f"{s.topics.update(round_, device)}{CHUNK_SEP}0",
                    wire.encode(frame, signer=s.stranger)))
    return out


def chunk_flood(s: Session) -> Finding:
    devices, r0 = s.targets() or ["audit"], s.last_round()
    pool = _flood_chunks(s, devices, max(r0, 1), 256)
    sent, start = 0, time.time()
    while time.time() < start + s.opts.seconds:
        topic, chunk = pool[sent % len(pool)]
        s.t.publish(topic, chunk)
        sent += 1
        time.sleep(max(0.0, start + sent / s.opts.flood_rate - time.time()))
    s.t.flush()
    return _kept_going(s, "chunk-flood", devices, start, r0,
                       f"{sent} chunks in {s.opts.seconds:g}s", HELD)


def giant_message(s: Session) -> Finding:
    """One message of ``giant_bytes`` on an update topic: does the broker pass it on?
    A small probe first tells whether this client may read the topic at all."""
    topic = s.topics.update(FAR_ROUND + 1, (s.targets() or ["audit"])[0])
    got: list[int] = []
    arrived = threading.Condition()

    def sink(t: str, payload: bytes, retain: bool) -> None:
        with arrived:
            got.append(len(payload))
            arrived.notify_all()

    def delivered(size: int, timeout: float) -> bool:
        with arrived:
            return arrived.wait_for(lambda: any(n >= size for n in got), timeout)

    listener, sender = s.connect("listener", sink), None
    mib = s.opts.giant_bytes / (1 << 20)
    try:
        listener.watch(topic)
        time.sleep(0.5)
        sender = s.connect("giant")
        sender.publish(topic, b"fedge audit probe")
        if not delivered(1, 5.0):
            return Finding("giant-message", NOT_OBSERVED, f"this client may not read "
                           f"{topic} (a small probe did not arrive either): run the audit "
                           "with credentials that may, to check the broker's size limit")
        sender.publish(topic, bytes(s.opts.giant_bytes))
        sender.flush(max(30.0, s.opts.seconds))
        if delivered(s.opts.giant_bytes, max(30.0, s.opts.seconds)):
            return Finding("giant-message", NOT_REFUSED, f"NOT REFUSED by the broker: a "
                           f"{mib:g} MiB message was delivered; set message_size_limit")
    finally:
        listener.close()
        if sender is not None:
            sender.close(flush_timeout=0)
    return Finding("giant-message", REFUSED, f"a {mib:g} MiB message was not delivered "
                   "(a small probe was)")


TAKEOVER_TIMEOUT = 30.0  # seconds for the broker to accept or refuse the takeover


def client_id_takeover(s: Session) -> Finding:
    """Connect with the aggregator's client id (after closing the audit's watcher: run
    it last). If the broker accepts, it has just
    knocked the aggregator off (it reconnects): the disconnect is immediate, and the
    session is persistent so that the aggregator's subscriptions survive."""
    client_id = f"fedge-{s.opts.job}-aggregator"
    # The last attack: the audit's own watcher goes first. Where the broker names a client
    # by its certificate (fedge secure init's device listener), both connections would
    # be the same client and knock each other off, each reconnect undoing the other.
    s.close()
    try:  # a TLS handshake on a busy broker host can take long: only an answer counts
        t = s.connect("takeover", client_id=client_id, persistent=True,
                      timeout=TAKEOVER_TIMEOUT)
    except FedgeError as e:
        if str(e).endswith("no answer"):
            return Finding("client-id", NOT_OBSERVED, f"no answer as {client_id!r} within "
                           f"{TAKEOVER_TIMEOUT:g}s: neither accepted nor refused")
        return Finding("client-id", REFUSED, f"connection as {client_id!r} refused: {e}")
    t.close(flush_timeout=0)
    who = s.creds.get("username") or "an anonymous client"
    return Finding("client-id", NOT_REFUSED, f"{who} connected as {client_id!r}: the broker "
                   "does not bind client ids to identities")


ATTACKS: dict[str, Callable[[Session], Finding]] = {}


def register(name: str, attack: Callable[[Session], Finding]) -> None:
    ATTACKS[name] = attack


for _name, _attack in (("forged-stop", forged_stop), ("forged-task", forged_task),
                       ("forged-plan", forged_plan), ("chunk-flood", chunk_flood),
                       ("giant-message", giant_message), ("client-id", client_id_takeover)):
    register(_name, _attack)


def run(opts: AuditOptions, say: Callable[[str], None] = print) -> list[Finding]:
    """Every registered attack, in order; each finding is said as it is made, and
    written with the job's state to ``opts.json_out``."""
    s = Session(opts)
    findings: list[Finding] = []
    try:
        if s.last_round() == 0:
            raise UsageError(f"job {opts.job!r}: no model round seen on "
                             f"{s.topics.model('+', '+')} within {opts.settle:g}s: is the "
                             "job live on this broker?")
        say(f"audit of job {opts.job!r} on {opts.broker}: {len(s.online())} devices online, "
            f"last model round {s.last_round()}")
        # the takeover closes the watcher: last, whatever was registered after it
        for name, attack in sorted(ATTACKS.items(), key=lambda kv: kv[0] == "client-id"):
            try:
                findings.append(attack(s))
            except TransportError as e:  # e.g. a second client of a certificate-bound
                # identity: the broker gives both the same client id, one knocks the
                # other off, and neither connects for long enough
                findings.append(Finding(name, NOT_OBSERVED, f"not run: {e}"))
            say(findings[-1].line())
    finally:
        s.close()
    if opts.json_out is not None:
        report = {"job": opts.job, "broker": opts.broker,
                  "refused": all(f.verdict != NOT_REFUSED for f in findings),
                  "attacks": [asdict(f) for f in findings]}
        Path(opts.json_out).write_text(json.dumps(report, indent=1))
    return findings
