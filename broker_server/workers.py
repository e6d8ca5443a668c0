"""An aggregator worker: a share of each round's updates, validated, folded and saved
exactly as the aggregator does, handed to the coordinator as one partial sum.

Workers share the update topic through an MQTT shared subscription
(``$share/fedge-<job>/fedge/<job>/round/+/update/+``), so the broker delivers each
update to one of them. The coordinator (``coordinator.py``, inside ``fedge serve``)
says on the retained ``workers/round`` which round is open: its tasks, codec, seed
and the sha256 of its model frame. The worker takes the reference weights from
that retained model frame (what the devices trained from), not from anyone's
memory. Per accepted update it saves the payload (a restarted worker loses
nothing) and reports ``accepted``; at "close" it publishes the partial sum of
the devices the coordinator lists for it, rebuilt from its saved payloads when
it holds a device that another worker reported first (exactly once). One loop
thread does everything; transport callbacks only enqueue. A malformed message
is logged and counted, never fatal.
"""
from __future__ import annotations

import logging
import math
import os
import queue
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from broker_server.guard import GuardError, UpdateGuard
from broker_server.intake import pump, update_expect, update_meta
from broker_server.scaleout import (Accepted, Refused, WorkRound, check_worker_id,
                                    fold_strategy, parse_work, status)
from broker_server.records import digest
from broker_server.state import atomic_write
from broker_server.trust import ServerTrust
from device_runtime import codecs, messages, wire
from device_runtime.codecs import CodecContext
from device_runtime.errors import FedgeError, WireError
from device_runtime.topics import Topics, check_id
from device_runtime.transport.base import RECONNECTED, Transport

log = logging.getLogger("fedge.worker")
MAX_PENDING = 1024  # updates held until their round message or model arrives


def group(job: str) -> str:
    """The shared subscription's group: one per job."""
    return f"fedge-{job}"


@dataclass(frozen=True)
class WorkerOptions:
    job: str
    worker: str  # this worker's id (a topic level and a file name)
    state_dir: Path
    idle_timeout: float | None = None  # exit after this long without a round message
    parent_pid: int | None = None  # started by fedge serve: exit when it is gone


class Worker:
    def __init__(self, transport: Transport, opts: WorkerOptions, trust: ServerTrust):
        self.t, self.opts = transport, opts
        # The aggregator's key and the fleet's registry: what it sends is signed like the
        # aggregator's, what devices send is checked against their keys.
        self.trust, self.key = trust, trust.signer.public
        transport.signer = trust.signer
        self.id = check_worker_id(opts.worker)
        self.topics = Topics(opts.job)
        self.root = Path(opts.state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.events: queue.Queue = queue.Queue()
        self.work: WorkRound | None = None  # the latest round message
        self.model_sha, self.model_topic = "", ""
        self.fold = None  # the open round's, once its model frame is here
        self.reference: dict = {}  # its model frame's tensors, and their shapes
        self.shapes: dict = {}
        self.strategy = self.codec = None  # the round's, for its checks and fold
        self.guard = _guard({})  # the round's bounds, as the coordinator sent them
        self.held: dict[str, bytes] = {}  # device -> its Accepted report, this round
        self.pending: list[tuple[dict, bytes]] = []
        self.served: set[str] = set()  # coordinator sessions whose rounds we saw
        self.counts = {"accepted": 0, "duplicates": 0, "rejected": 0, "partials": 0,
                       "rebuilt": 0}
        self.rejected: list[dict] = []
        self.stopping = False

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.events.put((topic, payload))

    def _reject(self, where: dict, why: str) -> None:
        log.warning("worker %s rejected %s from %s: %s", self.id, where.get("kind"),
                    where.get("device"), why)
        self.counts["rejected"] += 1
        self.rejected.append({"round": where.get("round"), "device": where.get("device"),
                              "kind": where.get("kind"), "reason": why})

    # --- the loop ---------------------------------------------------------------
    def run(self) -> dict:
        """Serve rounds until the coordinator says the job is done; the counts."""
        self.t.on_connect = lambda: self.events.put((RECONNECTED, b""))
        self.t.on_error = lambda topic, why: self._reject({"kind": "chunk"}, why)
        self.t.subscribe(self.topics.work, self._enqueue)
        self.t.subscribe(self.topics.shared_update(group(self.opts.job)), self._enqueue)
        # After the subscriptions: the broker handles one connection's packets in order,
        # so once the coordinator sees "online", updates reach this worker too.
        self._status("online")
        last = time.time()
        while not self.stopping:
            if self.opts.parent_pid and os.getppid() != self.opts.parent_pid:
                # An orphan would fight its successor for the same client id.
                log.warning("worker %s: fedge serve is gone, stopping", self.id)
                break
            if self._pump(0.2):
                last = time.time()
            elif self.opts.idle_timeout and time.time() - last > self.opts.idle_timeout:
                log.warning("worker %s: no round message for %gs, stopping", self.id,
                            self.opts.idle_timeout)
                break
        self._status("offline")
        return dict(self.counts)

    def _status(self, state: str) -> None:
        self.t.publish(self.topics.worker(self.id, "status"),
                       status(self.id, state, self.trust.signer, self.opts.job, self.counts),
                       retain=True)

    def _pump(self, timeout: float) -> bool:
        """Handle every queued message; whether a round message was among them."""
        self._saw_work = False
        pump(self.events, timeout, self.topics.parse, self._handle, self._reject)
        return self._saw_work

    def _handle(self, topic: str, where: dict, payload: bytes) -> None:
        if topic == RECONNECTED:
            self._status("online")  # the will may have said "offline"
        elif where["kind"] == "work":
            self._saw_work = True
            self._on_work(payload)
        elif where["kind"] == "model":
            self._on_model(where, payload)
        elif where["kind"] == "update":
            self._on_update(where, payload)

    # --- rounds -----------------------------------------------------------------
    def _on_work(self, payload: bytes) -> None:
        w = parse_work(payload, self.key, self.opts.job)
        if w.state == "done":
            # A "done" left retained by an earlier run does not stop a worker that has
            # not served that run.
            self.stopping = w.session in self.served
            return
        fold_strategy(w.strategy, w.options)  # a combination we cannot fold: refused here
        self.served.add(w.session)
        prev, self.work = self.work, w
        sha = w.models.get("full", "")
        if prev is None or prev.round != w.round or sha != self.model_sha:
            self._start(w, sha)
        elif prev.session != w.session:  # the coordinator restarted: it lost our reports
            for report in self.held.values():
                self.t.publish(self.topics.worker(self.id, "accepted"), report)
        self._after_change()

    def _start(self, w: WorkRound, sha: str) -> None:
        """A new round (or a new model for it): fold from scratch, relative to its frame."""
        self.fold, self.held, self.model_sha = None, {}, sha
        self.guard = _guard(w.guard)
        for d in self.root.glob("round-*"):  # saved updates of older rounds or models
            if d.is_dir() and d.name != self._dir().name:
                shutil.rmtree(d, ignore_errors=True)
        if self.model_topic:
            self.t.unsubscribe(self.model_topic)
        self.model_topic = self.topics.model(w.round, "full")
        self.t.subscribe(self.model_topic, self._enqueue)  # retained: it comes at once

    def _on_model(self, where: dict, payload: bytes) -> None:
        w = self.work
        if w is None or where["round"] != w.round or self.fold is not None:
            return
        frame = wire.decode(payload, wire.Expect(kind="model", job=self.opts.job,
                                                 round=w.round), key=self.key)
        sha = wire.content_sha(payload)
        if sha != self.model_sha:
            raise WireError(f"model of round {w.round}: sha256 expected "
                            f"{self.model_sha[:16]}... (the round message's), got "
                            f"{sha[:16]}...")
        self.reference = frame.tensors
        self.shapes = {k: tuple(v.shape) for k, v in frame.tensors.items()}
        self.strategy = fold_strategy(w.strategy, w.options)
        self.codec = codecs.get(w.codec)
        self.fold = self._new_fold()
        for path in sorted(self._dir().glob("*.fdg")):  # accepted before a restart
            data = path.read_bytes()
            try:  # bounded when it was accepted: the reference it met may be gone
                self._accept(path.stem, data, digest(data), save=False)
            except FedgeError as e:
                self._reject({"kind": "saved update", "device": path.stem}, str(e))
        self._after_change()

    def _after_change(self) -> None:
        if self.fold is None:
            return
        pending, self.pending = self.pending, []
        for where, payload in pending:
            try:
                self._on_update(where, payload)
            except FedgeError as e:
                self._reject(where, str(e))
        if self.work.state == "close":
            self._send_partial(self.work)

    def _new_fold(self):
        w = self.work
        ctx = CodecContext(round=w.round, seed=w.seed, reference=self.reference)
        return self.strategy.fold(w.round, self.reference, self.codec, ctx)

    # --- updates ----------------------------------------------------------------
    def _on_update(self, where: dict, payload: bytes) -> None:
        w, r, device = self.work, where["round"], where["device"]
        if w is None or self.fold is None or r > w.round or \
                (r == w.round and w.state == "open" and device not in w.devices):
            self._hold(where, payload)  # its round message or model is on its way
            return
        if r < w.round or w.state != "open":
            raise WireError(f"round: expected {w.round} (open), got {r} (late update)")
        name = digest(payload)
        if device in self.held:
            self.counts["duplicates"] += 1
            log.info("worker %s: duplicate update from %s in round %d ignored", self.id,
                     device, r)
            return
        self._accept(device, payload, name, save=True)

    def _hold(self, where: dict, payload: bytes) -> None:
        if len(self.pending) >= MAX_PENDING:
            old, _ = self.pending.pop(0)
            self._reject(old, f"held too long: more than {MAX_PENDING} updates wait for "
                              "their round")
        self.pending.append((where, payload))

    def _accept(self, device: str, payload: bytes, name: str, save: bool) -> None:
        """Validate, fold, save, report: the aggregator's checks (broker_server.intake)."""
        w = self.work
        try:
            frame, samples, variant, norm = self._check(device, payload, enforce=save)
        except GuardError as e:  # the coordinator would otherwise wait for the device
            self.t.publish(self.topics.worker(self.id, "refused"), messages.seal(
                Refused(self.id, w.round, device, str(e)), self.opts.job, self.id,
                self.trust.signer, w.round))
            raise
        self.fold.add(device, samples, frame.tensors, frame.params, variant=variant)
        self.guard.accept(device, norm)
        if save:  # only after the fold accepted it: a rejected payload leaves no trace
            self._dir().mkdir(exist_ok=True)
            atomic_write(self._dir() / f"{device}.fdg", payload)
        report = messages.seal(Accepted(self.id, w.round, device, samples, name,
                                        len(payload), dict(frame.meta), norm or 0.0),
                               self.opts.job,
                               self.id, self.trust.signer, w.round)
        self.held[device] = report
        self.counts["accepted"] += 1
        self.t.publish(self.topics.worker(self.id, "accepted"), report)

    def _check(self, device: str, payload: bytes, enforce: bool = True
               ) -> tuple[wire.Frame, int, str, float | None]:
        """(frame, the samples it counts with, variant, change RMS) of a valid update;
        the guard's bounds are checked only if ``enforce``."""
        w = self.work
        check_id("device", device)  # it becomes a file name
        task = w.devices.get(device)
        if task is None:
            raise WireError(f"device: {device!r} has no task in round {w.round}")
        if task["variant"] != "full":
            raise WireError(f"variant: expected 'full' (the only model a worker folds), "
                            f"got {task['variant']!r}")
        frame = self.trust.update(payload, update_expect(
            self.opts.job, w.round, device, self.codec, self.strategy, task["variant"],
            self.shapes, task["samples"], task["nonce"]), device)
        samples, variant = update_meta(frame, task["variant"])
        norm = self.guard.measure(device, self.codec, frame.tensors, frame.params,
                                  CodecContext(w.round, w.seed, self.reference, device), enforce)
        return frame, self.guard.weight(device, samples), variant, norm

    # --- close ------------------------------------------------------------------
    def _send_partial(self, w: WorkRound) -> None:
        want = w.close.get(self.id)
        if not want:
            return  # nothing of ours is in the round (or all of it was reported first elsewhere)
        have = sorted(d for d in set(want) if d in self.held)
        if len(have) < len(set(want)):
            log.warning("worker %s: asked for %s in round %d, which it does not hold",
                        self.id, sorted(set(want) - set(have)), w.round)
        fold = self.fold
        if set(self.held) != set(have):  # we hold a device another worker reported first
            fold = self._new_fold()
            for device in have:
                frame, samples, variant, _ = self._check(
                    device, (self._dir() / f"{device}.fdg").read_bytes(), enforce=False)
                fold.add(device, samples, frame.tensors, frame.params, variant=variant)
            self.counts["rebuilt"] += 1
        tensors, meta = fold.partial()
        frame = wire.Frame("partial", self.opts.job, w.round, self.id, w.codec, tensors,
                           meta={**meta, "devices": have, "model": self.model_sha})
        self.t.publish(self.topics.worker(self.id, "partial"), self.trust.frame(frame))
        self.counts["partials"] += 1

    def _dir(self) -> Path:
        """Where the open round's accepted updates are saved: per round and model."""
        r = self.work.round if self.work else 0
        return self.root / f"round-{r}-{self.model_sha[:16]}"


def _guard(g: dict) -> UpdateGuard:
    """The guard a round message describes (parse_work checked it); none: no bounds."""
    if not g:
        return UpdateGuard(math.inf)
    return UpdateGuard(math.inf if g["factor"] is None else float(g["factor"]),
                       g["max_samples"], dict(g["registered"]), list(g["previous"]))


__all__ = ["Worker", "WorkerOptions", "group"]
