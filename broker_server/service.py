"""The aggregator service: rounds over MQTT with deadlines, quorum and checkpoints.

One ``run()`` loop: publish the plan, wait for devices, and per round publish
the model (retained, once per variant), send each assigned device its task,
collect and validate updates until all are in or the deadline passes with a
quorum, aggregate with the strategy, checkpoint, repeat. Transport callbacks
only enqueue; everything happens on the loop's thread, so no state is shared.
A malformed or unexpected message is logged and counted, never fatal.
"""
from __future__ import annotations

import logging
import queue
import time
from typing import Callable

from broker_server import batches
from broker_server.downlink import HELD_KEY, Downlink, check_downlink, recount_fetch
from broker_server.errors import BrokerServerError
from broker_server.guard import UpdateGuard
from broker_server.heartbeat import Heartbeat
from broker_server.evaluation import DeviceEvaluation
from broker_server.intake import pump, reload_accepted, update_expect, update_meta
from broker_server.options import ServeOptions
from broker_server.records import (Refusals, RoundState, digest, job_report, round_record,
                                    server_time)
from broker_server.state import StateStore
from broker_server.strategies import DeviceInfo, create
from broker_server.strategies.base import TrainsAlone
from broker_server.trust import SERVER, ServerTrust
from device_runtime import codecs, messages, wire
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError
from device_runtime.notice import EVERY, Notice
from device_runtime.topics import Topics
from device_runtime.transport.base import RECONNECTED, Transport

log = logging.getLogger("fedge.server")


class Aggregator:
    def __init__(self, transport: Transport, opts: ServeOptions, model_config: dict,
                 initial_weights: dict, evaluate: Callable[[dict], float] | None = None,
                 on_round: Callable[[dict], None] | None = None, scale_out=None, *,
                 trust: ServerTrust):
        self.t, self.opts = transport, opts
        self.trust = trust  # signs what it sends, checks what devices send
        transport.signer = trust.signer
        self.scale = scale_out  # coordinator.ScaleOut: workers fold the updates
        self.topics = Topics(opts.job)
        self.codec = codecs.get(opts.codec)
        extra = {"options": opts.strategy_options} if opts.strategy_options else {}
        self.strategy = create(opts.strategy, epochs=opts.epochs, batch_size=opts.batch_size,
                               lr=opts.lr, **extra)
        check_downlink(opts.downlink, opts.strategy)
        self.downlink = Downlink(opts.downlink, opts.job, trust.signer)
        self.model_config = model_config
        self.evaluate, self.on_round = evaluate, on_round
        self.notice = Notice(None)  # what it waits for, every ~10 s (serve: the console)
        self.store = StateStore(opts.state_dir, opts.job)
        self.state, saved = self.store.load()
        self.weights = saved if saved is not None else initial_weights
        self.resumed_from = self.state.completed
        self.guard = UpdateGuard(opts.norm_bound, opts.max_samples, self.state.registered,
                                 list(self.state.norms))
        if saved is not None:
            self.strategy.load_state(self.state.extra)
            kept = self.store.load_kept(self.state)
            held = kept.pop(HELD_KEY, None)
            self.downlink.restore(held[1] if held else None, self.state.completed)
            if isinstance(self.strategy, TrainsAlone):
                self.strategy.load_kept(kept)
        self.in_sync: set[str] = set()  # devices that trained from last round's model
        self.shapes = {k: tuple(v.shape) for k, v in self.weights.items()}
        self.devices: dict[str, messages.Status] = {}
        # device -> the last error it published with state "error" (e.g. a refused export)
        self.device_errors: dict[str, str] = {}
        self.rejected = Refusals(log)
        self.duplicates = 0
        self.events: queue.Queue = queue.Queue()
        self.round: RoundState | None = None
        self.last_models: dict[str, int] = {}  # variant -> bytes, of the last closed round
        self.last_sync = 0  # bytes of the last closed round's sync frame
        self.assets: dict[str, bytes] = {}  # name -> frame, published once per job
        self.assets_sent: set[tuple[str, str]] = set()  # (device, asset): counted once each
        self.side = self.strategy.side_channel(opts.job)  # e.g. dpfl's batch exchange
        self.evaluation = DeviceEvaluation(self, opts.eval_every)
        # Called whenever the loop waits for messages; raising from it ends run() with that
        # error (``fedge simulate --procs``: a device process died, the round would wait
        # for its devices forever).
        self.watch: Callable[[], None] | None = None

    # --- transport side: enqueue only ------------------------------------------
    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.events.put((topic, payload))

    def _reject(self, where: dict, why: str) -> None:
        self.rejected.add(where, why)

    # --- the loop ---------------------------------------------------------------
    def run(self) -> dict:
        plan = messages.Plan(self.opts.job, self.opts.strategy, self.opts.codec,
                             self.opts.rounds, self.model_config, self.opts.min_devices,
                             self.opts.round_timeout,
                             {"epochs": self.opts.epochs, "batch_size": self.opts.batch_size,
                              "lr": self.opts.lr, **self.evaluation.plan()},
                             {"full": {"tensors": {k: list(s) for k, s in self.shapes.items()}}},
                             self.trust.session, time.time())
        self.t.on_error = lambda topic, why: self._reject({"kind": "chunk", "topic": topic}, why)
        # A restarted broker may have lost retained messages: publish them again.
        self.t.on_connect = lambda: self.events.put((RECONNECTED, b""))
        self.t.gate = self.trust.gate(self.topics)
        self.t.subscribe(self.topics.status(), self._enqueue)
        if self.scale:
            self.scale.subscribe(self._enqueue)
        else:
            self.t.subscribe(self.topics.update(), self._enqueue)
        self.t.subscribe(self.topics.acts(), self._enqueue)
        self._plan = self.trust.seal(plan, nonce=self.trust.session)
        self._publish_assets()
        if self.state.completed < self.opts.rounds:
            self.t.clear_retained(self.topics.control)  # a stop left by an earlier run
        self.t.publish(self.topics.plan, self._plan, retain=True)
        if self.state.completed >= self.opts.rounds:
            self.notice("state", f"{self.opts.state_dir} holds this job finished "
                        f"({self.state.completed} of {self.opts.rounds} rounds): nothing to run")
        elif self.resumed_from:
            self.notice("state", f"resumed from {self.opts.state_dir} after round "
                        f"{self.resumed_from}")
        if self.scale:
            self.scale.wait_ready(self)
        with Heartbeat(self):  # devices waiting meanwhile know the job is alive
            while self.state.completed < self.opts.rounds:
                self._run_round(self.state.completed + 1)
        self.store.flush()  # every update the syncer holds, durable before "done"
        # Retained, so that a device that was away when the job ended learns it too.
        self.t.publish(self.topics.control, self.trust.seal(
            messages.Control("stop", "done"), nonce=self.trust.session), retain=True)
        return self.report()

    def _publish_assets(self) -> None:
        for name, tensors in self.strategy.assets().items():
            self.assets[name] = self.trust.frame(wire.Frame("asset", self.opts.job, 0, SERVER,
                                                            "fp32", tensors))
            self.t.publish(self.topics.asset(name), self.assets[name], retain=True)

    def _wait_for_devices(self, start: float) -> None:
        while (online := len(self._online())) < self.opts.min_devices:
            self.notice("devices", f"job {self.opts.job}: waiting for devices, {online} of "
                        f"{self.opts.min_devices} online (the quorum)")
            if self.opts.wait_timeout is not None and \
                    time.time() - start > self.opts.wait_timeout:
                raise BrokerServerError(
                    f"only {len(self._online())} of {self.opts.min_devices} devices came "
                    f"online within {self.opts.wait_timeout:g}s")
            self._pump(0.2)

    def _online(self) -> list[DeviceInfo]:
        online = [DeviceInfo(d, s.profile, s.samples) for d, s in sorted(self.devices.items())
                  if s.state == "online"]
        # Every device is seen here before it is given a task: its registration for the job.
        if self.guard.register((d.id, d.samples) for d in online if d.samples > 0):
            self.store.save_registered(self.state)
        return online

    def _run_round(self, r: int) -> None:
        self._wait_for_devices(time.time())
        rs = self.round = RoundState(r, started=time.time())
        rs.deadline = messages.task_deadline(self.opts.round_timeout, rs.started)
        self._publish_models(rs)
        ctx = CodecContext(round=r, seed=self._task_seed(r), reference=rs.reference)
        rs.fold = self.strategy.fold(r, rs.reference, self.codec, ctx)
        reload_accepted(self, rs)
        self._assign(rs, self._online())
        alone = isinstance(self.strategy, TrainsAlone) and not self.strategy.needs_updates(r)
        while True:
            self._pump(0.05)
            batches.release(self)  # lockstep: the batches held for a device that reported
            pending = set(rs.assigned) - set(rs.accepted) - rs.refused
            if not pending and (rs.accepted or alone):
                break
            if time.time() - rs.started >= EVERY:
                self.notice(f"round {r}", f"round {r}: {len(rs.accepted)} of "
                            f"{len(rs.assigned)} updates in, quorum {self.opts.min_devices}, "
                            f"deadline in {max(0.0, rs.deadline - time.time()):.0f}s")
            if time.time() >= rs.deadline:
                if len(rs.accepted) >= self.opts.min_devices:
                    break
                self._assign(rs, [d for d in self._online() if d.id not in rs.assigned])
                self._resend(rs, pending)
        if self.scale:
            self.scale.gather(self, rs)  # the workers' partial sums into rs.fold
        self._close_round(rs)

    def _publish_models(self, rs: RoundState) -> None:
        rm = self.downlink.advance(self.weights, rs.number, self._task_seed(rs.number - 1))
        rs.reference, rs.sync, rs.base_sha = rm.weights, rm.sync, rm.base_sha256
        if rm.sync is not None:
            rs.sync_sha = wire.content_sha(rm.sync)
            self.t.publish(self.topics.sync(rs.number, "full"), rm.sync, retain=True)
        for variant, w in self.strategy.variants(rm.weights).items():
            self._publish_variant(rs, variant, w, rm.frame if variant == "full" else None)

    def _publish_variant(self, rs: RoundState, variant: str, w: dict,
                         frame: bytes | None = None) -> None:
        frame = frame or self.trust.frame(wire.Frame("model", self.opts.job, rs.number, SERVER,
                                                     "fp32", w))
        rs.model_sha[variant] = wire.content_sha(frame)
        rs.frames[variant] = frame
        rs.shapes[variant] = {k: tuple(v.shape) for k, v in w.items()}
        rs.references[variant] = w  # what the guard measures an update's change against
        rs.model_bytes[variant] = self.t.publish(self.topics.model(rs.number, variant),
                                                 frame, retain=True)

    def _assign(self, rs: RoundState, devices: list[DeviceInfo]) -> None:
        for device, a in self.strategy.assign(rs.number, devices).items():
            if a.variant not in rs.model_sha:  # e.g. SplitMix: a set of bases, known now
                self._publish_variant(rs, a.variant,
                                      self.strategy.variant(rs.reference, a.variant))
            base_sha256, sync_sha256 = self._sync_of(rs, a.variant)
            task = messages.Task(
                round=rs.number, device=device, variant=a.variant,
                model_sha256=rs.model_sha[a.variant], deadline=rs.deadline, epochs=a.epochs,
                batch_size=a.batch_size, lr=a.lr, seed=self._task_seed(rs.number),
                codec=self.opts.codec, steps=int(a.steps), model=dict(a.model),
                uplink=a.uplink, assets={n: wire.content_sha(self.assets[n]) for n in a.assets},
                base_sha256=base_sha256, sync_sha256=sync_sha256,
                nonce=self.trust.nonce(rs.number, device), session=self.trust.session)
            rs.assigned[device] = task
            self.trust.open_tasks[device] = (rs.number, task.nonce)
            if device not in rs.accepted:
                self._send_task(rs, task)
        if self.scale:
            self.scale.announce(self, rs)

    def _resend(self, rs: RoundState, pending: set[str]) -> None:
        """Past the deadline without a quorum: the task again (same nonce, so a device
        that sent its update answers with the same one) to each assigned device that
        has not reported, at most once per round timeout (an update may have been lost)."""
        now = time.time()
        if now < rs.resent_at + self.opts.round_timeout:
            return
        rs.resent_at = now
        for device in sorted(pending):
            if device in rs.assigned:
                self._send_task(rs, rs.assigned[device])

    def _sync_of(self, rs: RoundState, variant: str) -> tuple[str, str]:
        """(base_sha256, sync_sha256) for a task: the coded change, if there is one."""
        if rs.sync is None or variant != "full":
            return "", ""
        return rs.base_sha, rs.sync_sha

    def _task_seed(self, r: int) -> int:
        """The round's seed (local shuffling, codec noise): both ends derive it."""
        return self.opts.seed * 100_003 + r

    def _send_task(self, rs: RoundState, task: messages.Task) -> None:
        rs.downlink_bytes += self.t.publish(
            self.topics.task(rs.number, task.device),
            self.trust.seal(task, rs.number, task.nonce, task.device))
        # What the device fetches: the change if it trained last round, else the model.
        via = "sync" if task.sync_sha256 and task.device in self.in_sync else "full"
        rs.via[task.device] = via
        rs.downlink_bytes += len(rs.sync) if via == "sync" else rs.model_bytes[task.variant]
        for name in task.assets:  # and, once per job, the assets it needs
            if (task.device, name) not in self.assets_sent:
                self.assets_sent.add((task.device, name))
                rs.downlink_bytes += len(self.assets[name])

    def _pump(self, timeout: float) -> None:
        """Handle every queued message (waiting up to ``timeout`` for the first)."""
        if self.watch is not None:
            self.watch()
        pump(self.events, timeout, self.topics.parse, self._handle, self._reject)
        self.store.sync_updates()  # the burst just handled, in one journal commit

    def _handle(self, topic: str, where: dict, payload: bytes) -> None:
        if topic == RECONNECTED:
            self._republish()
        elif where["kind"] == "status":
            self._on_status(where, payload)
        elif where["kind"] == "update":
            self._on_update(where, payload)
        elif where["kind"] == "acts":
            batches.on_acts(self, where, payload)
        elif where["kind"] == "worker" and self.scale:
            self.scale.handle(self, where, payload)

    def _republish(self) -> None:
        log.info("reconnected to the broker: republishing the plan and the open round's models")
        self.t.publish(self.topics.plan, self._plan, retain=True)
        for name, frame in self.assets.items():
            self.t.publish(self.topics.asset(name), frame, retain=True)
        if self.round is not None:
            for variant, frame in self.round.frames.items():
                self.t.publish(self.topics.model(self.round.number, variant), frame, retain=True)
            if self.round.sync is not None:
                self.t.publish(self.topics.sync(self.round.number, "full"), self.round.sync,
                               retain=True)
        if self.scale:
            self.scale.republish()

    def _on_status(self, where: dict, payload: bytes) -> None:
        status = self.trust.status(where["device"], payload)
        was = self.devices.get(status.device)
        self.devices[status.device] = status
        if status.state == "error" and self.device_errors.get(status.device) != status.error:
            # Once per distinct error: a retained status comes back on every resubscribe.
            # The device is not "online", so it is assigned nothing.
            log.warning("device %s is in error: %s", status.device, status.error or "(no reason)")
            self.device_errors[status.device] = status.error
        rs = self.round
        if status.state != "online" or rs is None:
            return
        if status.device in rs.assigned and status.device not in rs.accepted and \
                (was is None or was.state != "online" or status.ts != was.ts):
            self._send_task(rs, rs.assigned[status.device])  # it came back mid-round

    def _on_update(self, where: dict, payload: bytes) -> None:
        rs = self.round
        device, r = where["device"], where["round"]
        if rs is None or r != rs.number:
            raise WireError(f"round: expected {rs.number if rs else 'none'}, got {r} "
                                 "(late or early update)")
        if device not in rs.assigned:
            raise WireError(f"device: {device!r} has no task in round {r}")
        if device in rs.accepted:
            self.duplicates += 1
            log.info("duplicate update from %s in round %d ignored", device, r)
            return
        variant = rs.assigned[device].variant
        frame = self.trust.update(payload, update_expect(
            self.opts.job, r, device, self.codec, self.strategy, variant, rs.shapes[variant],
            self.devices[device].samples if device in self.devices else 0,
            rs.assigned[device].nonce), device)
        # Persisted only after the fold accepted it: a rejected payload leaves no trace.
        self._fold_in(rs, frame, payload)
        self.store.save_update(r, device, payload)
        rs.uplink_bytes += len(payload)

    def _fold_in(self, rs: RoundState, frame: wire.Frame, payload: bytes,
                 enforce: bool = True) -> None:
        """Validate and fold one update into the round (WireError changes nothing). Its
        weight and size are bounded first (guard.py); a device refused for its size is
        not waited for (an update it sends again is considered)."""
        task = rs.assigned.get(frame.device)
        samples, variant = update_meta(frame, task.variant if task is not None else None)
        with server_time(rs):
            norm = self.guard.screen(rs, self.codec, self._task_seed(rs.number), frame,
                                     variant, enforce)
            rs.fold.add(frame.device, self.guard.weight(frame.device, samples),
                        frame.tensors, frame.params, variant=variant)
        self.guard.accept(frame.device, norm, rs)
        rs.folded.append((frame.device, digest(payload)))
        rs.accepted[frame.device] = dict(frame.meta)
        recount_fetch(rs, frame.device, frame.meta, variant)

    def _close_round(self, rs: RoundState) -> None:
        with server_time(rs):
            self.weights = rs.fold.result()
        if rs.number < self.opts.rounds:  # the next round's frames, beside the evaluation
            self.downlink.prepare(self.weights, rs.number + 1, self._task_seed(rs.number))
        acc = self.evaluate(self.weights) if self.evaluate else None
        record = round_record(rs, acc, self.duplicates, self.rejected.total)
        if self.evaluation.due(rs.number):  # before the checkpoint: its record holds it
            record["device_eval"] = self.evaluation.run(rs.number, self.weights)
        self.state.completed = rs.number
        self.state.history.append(record)
        self.state.extra = self.strategy.state()
        self.state.norms = self.guard.close()
        kept = self.strategy.kept() if isinstance(self.strategy, TrainsAlone) else {}
        if self.downlink.coded:  # a restart must rebuild the same frames
            kept = {**kept, HELD_KEY: ("fp32", rs.reference, {})}
        self.store.save_round(self.state, self.weights, kept)
        self.in_sync = set(rs.accepted)
        if rs.number > 1 and not self.last_models:  # resumed: at least the shared model
            self.last_models = {"full": rs.model_bytes.get("full", 0)}
        for variant, size in self.last_models.items():  # the round before's, now unused
            self.t.clear_retained(self.topics.model(rs.number - 1, variant),
                                  chunks=size // self.t.max_payload + 2)
        self.last_models = dict(rs.model_bytes)
        if rs.number > 1:
            self.t.clear_retained(self.topics.sync(rs.number - 1, "full"),
                                  chunks=self.last_sync // self.t.max_payload + 2)
        self.last_sync = len(rs.sync or b"")
        self.round = None
        self.trust.open_tasks.clear()
        if self.on_round:
            self.on_round(record)

    def report(self) -> dict:
        return job_report(self)
