"""The device agent: announce, take tasks, verify the model, train, send the update.

Every message it acts on is signed by the aggregator's key (``server_key``) and
bound to the job, the round, this device and the run's session or the task's
nonce; everything it sends is signed with its own key (``key``). Anything else
is refused with its reason and changes nothing. Given an export (a manifest
and a trusted key), it first checks it
(``preflight``) and, if that fails, publishes the refusal as its status and
stops before taking any task. Runs until the job's ``control`` says stop.
Transport callbacks only enqueue; the work happens on the agent's thread: what a
task asks (train and send weights or logits, run a frozen head, split learning)
is its uplink kind's handler (``device_runtime.uplinks``).
Torch is imported only when a task asks for local training, so the module
loads on a device without it. A plan or task whose model config names a custom
factory the operator did not allow (``AgentOptions.custom_models``) is refused
before anything is imported (``device_runtime.local_models``).
"""
from __future__ import annotations

import json
import logging
import platform
import queue
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import numpy as np

from device_runtime import fedge_version, messages, uplinks, wire
from device_runtime.errors import (
    FedgeError,
    TrustError,
    UnauthenticatedError,
    WireError,
)
from device_runtime.data import holdout_split
from device_runtime.follow import ServerMessages
from device_runtime.keys import PublicKey, Signer
from device_runtime.local_models import NO_CUSTOM, LocalModels
from device_runtime.model_sync import REBUILT
from device_runtime.notice import EVERY, Notice
from device_runtime.topics import Topics, check_id
from device_runtime.transport.base import Transport

log = logging.getLogger("fedge.device")
SYNC_PATIENCE = 10.0  # seconds to wait for a sync frame before fetching the whole model


@dataclass(frozen=True)
class AgentOptions:
    job: str
    device: str
    profile: str
    threads: int = 1  # torch threads for local training
    idle_timeout: float | None = None  # give up after this long without a plan/task
    manifest: str | None = None  # the export to check before any task (with trust)
    trust: str | None = None  # the public key its signature must verify with
    key: Signer | None = None  # this device's own key: signs its status and updates
    server_key: PublicKey | None = None  # the aggregator's: every message must verify
    # Custom model factories this device may build (its operator's, never a message's).
    custom_models: LocalModels = NO_CUSTOM
    allow_rollback: bool = False  # the operator's word: accept an older export version
    models_dir: str | None = None  # installed exports; default $FEDGE_HOME/models/<job>/<id>
    # Agents simulated in one process share its cores: at most this many train at once
    # (a semaphore they all hold; None: no limit, as on a device of its own).
    compute: AbstractContextManager | None = None


def status_will(topics: Topics, device: str, key: Signer) -> tuple[str, bytes]:
    """The retained "offline" status the broker publishes if the device drops, signed
    by the device in advance."""
    status = messages.Status(device, "offline", ts=time.time())
    return topics.status(device), messages.seal(status, topics.job, device, key)


class DeviceAgent:
    def __init__(self, transport: Transport, opts: AgentOptions, x: np.ndarray, y: np.ndarray):
        self.t, self.opts = transport, opts
        self.device = check_id("device", opts.device)
        if opts.key is None or opts.server_key is None:
            raise TrustError("device: expected its own signing key and the aggregator's "
                             "public key (fedge secure init issues both)")
        self.key = opts.key
        self.server = ServerMessages(opts.job, self.device, opts.server_key)
        transport.signer = opts.key
        transport.gate = self.server.gate
        self._before_plan: list[tuple[str, bytes]] = []  # tasks and stops, for the plan
        self._task_bytes = 0  # of the task being worked on, counted as downlink
        self.topics = Topics(opts.job)
        self.x, self.y = x, y  # what it trains on: the shard less the held-out part
        self._shard = (x, y)
        self.eval_x, self.eval_y = x[:0], y[:0]  # held out for "evaluate" tasks
        self.events: queue.Queue = queue.Queue()
        self.plan: messages.Plan | None = None
        self.models: dict[tuple[str, int, str], bytes] = {}  # (kind, round, variant) -> frame
        self.held: tuple[str, bytes] | None = None  # (sha256, frame) of the model last used
        self.assets: dict[str, bytes] = {}  # name -> frame as received
        self._assets: dict[tuple[str, str], dict] = {}  # (name, sha256) -> decoded tensors
        self._head: tuple[str, object] | None = None  # (sha256, onnxruntime session), EcoFed
        self.sent: dict[int, tuple[str, bytes]] = {}  # round -> (nonce, update), for a resend
        self.working: set[int] = set()  # rounds whose task is being worked on
        self.grads: dict[int, bytes] = {}  # round -> latest grad frame (dpfl)
        self._deferred: list[tuple[str, bytes]] = []  # tasks that came mid split round
        self._split_io = [0, 0, 0]  # dpfl this round: bytes up, bytes down, exchanges
        self._via = "full"  # how this round's model came: "sync" or "full"
        self.stopped = False
        self.rounds_done = 0
        self.notice = Notice(None)  # status lines while it waits (fedge device: the log)
        self._models: dict = {}  # variant -> torch model
        self.started = time.time()
        # Per round: bytes in and out and the work done, for reports and simulated time.
        self.history: list[dict] = []
        from device_runtime.session import default_providers

        # What ORT would use; a checked export replaces it with what it really got.
        self.runtime = {"ort_provider": default_providers()[0]}
        self.rollouts = None  # with an export: device_runtime.rollout.DeviceRollout

    def announce(self, state: str = "online", error: str = "") -> None:
        import onnxruntime

        s = messages.Status(self.device, state, self.opts.profile, int(len(self.y)),
                            {"fedge": fedge_version(), "python": platform.python_version(),
                             "numpy": np.__version__,
                             "onnxruntime": onnxruntime.__version__, **self.runtime},
                            error, time.time())
        self.t.publish(self.topics.status(self.device),
                       messages.seal(s, self.opts.job, self.device, self.key), retain=True)

    def check_export(self) -> None:
        """Verify the export (opts.manifest, opts.trust) before any task; on failure
        publish the refusal as the retained status (state "error") and raise it."""
        from device_runtime.rollout import adopt_export

        adopt_export(self)

    def run(self) -> int:
        """Process messages until the job stops; returns the rounds this device trained.

        With ``opts.manifest``, the export is checked first (``check_export``)."""
        if self.opts.manifest is not None:
            self.check_export()
        self.t.on_connect = self.announce  # re-announce after every reconnect
        self.t.subscribe(self.topics.plan, self._enqueue)
        self.t.subscribe(self.topics.control, self._enqueue)
        self.t.subscribe(self.topics.heartbeat, self._enqueue)
        self.t.subscribe(self.topics.asset(), self._enqueue)
        self.t.subscribe(self.topics.task("+", self.device), self._enqueue)
        self.t.subscribe(self.topics.grad("+", self.device), self._enqueue)
        self.t.subscribe(self.topics.rollout(self.device), self._enqueue)
        self.announce()
        last = time.time()
        # Without an idle timeout or status lines there is nothing to do between messages:
        # block, so that an idle agent costs no wake-ups (a simulated fleet runs hundreds).
        poll = 0.2 if self.opts.idle_timeout or self.notice.say else None
        while not self.stopped:
            try:
                topic, payload = self.events.get(timeout=poll)
            except queue.Empty:
                if self.opts.idle_timeout and time.time() - last > self.opts.idle_timeout:
                    log.warning("no message for %.0fs, giving up", self.opts.idle_timeout)
                    break
                if time.time() - last >= EVERY:
                    self.notice("idle", f"job {self.opts.job}: waiting for " + (
                        f"a task (rounds trained: {self.rounds_done})" if self.plan
                        else "the job's plan") + f", {time.time() - last:.0f}s since the "
                        "last message")
                continue
            last = time.time()
            self._handle(topic, payload)
            while self._deferred:  # tasks that arrived during a split round
                self._handle(*self._deferred.pop(0))
        return self.rounds_done

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.events.put((topic, payload))

    def _handle(self, topic: str, payload: bytes) -> None:
        where = self.topics.parse(topic)
        try:
            if where["kind"] == "plan":
                self._on_plan(payload)
            elif where["kind"] == "control":
                self._on_control(topic, payload)
            elif where["kind"] == "heartbeat":  # the server is alive: "last" moved on
                self.server.take_heartbeat(payload)
            elif where["kind"] == "asset":
                self.assets[where["asset"]] = payload
            elif where["kind"] in ("model", "sync"):
                self.models[(where["kind"], where["round"], where["variant"])] = payload
                self.models = {k: v for k, v in self.models.items() if k[1] >= where["round"] - 1}
            elif where["kind"] == "grad":
                self.grads = {r: b for r, b in self.grads.items() if r >= where["round"]}
                self.grads[where["round"]] = payload
            elif where["kind"] == "task":
                self._on_task(topic, payload, where["round"])
            elif where["kind"] == "rollout":
                if self.rollouts is None:
                    raise messages.MessageError("rollout: this device runs no export "
                                                "(start it with --manifest)")
                self.rollouts.handle(payload)
        except UnauthenticatedError as e:
            self.server.count(where.get("kind", "?"), topic, e)
        except FedgeError as e:
            log.warning("%s on %s: %s", type(e).__name__, topic, e)
            self.announce("online", error=f"{where.get('kind')}: {e}")
        except Exception as e:  # a bug in one task must not take the device off the job
            log.exception("unexpected error on %s", topic)
            self.announce("online", error=f"{where.get('kind')}: {type(e).__name__}: {e}")

    def _on_plan(self, payload: bytes) -> None:
        # A custom model the operator did not allow: refused, the old plan stays.
        self.plan = self.server.take_plan(payload, self.opts.custom_models.check_json)
        (self.x, self.y), (self.eval_x, self.eval_y) = holdout_split(
            *self._shard, self.plan.train.get("holdout", 0.0), self.device)
        waiting, self._before_plan = self._before_plan, []
        for item in waiting:  # tasks and stops that came first: judged by this plan
            self._handle(*item)

    def _on_control(self, topic: str, payload: bytes) -> None:
        if self.plan is None:  # its session is the plan's: judged when the plan comes
            self._before_plan = [*self._before_plan[-7:], (topic, payload)]
            return
        self.stopped = self.server.take_control(payload).action == "stop"

    def _on_task(self, topic: str, payload: bytes, round_: int) -> None:
        if self.plan is None:
            self._before_plan = [*self._before_plan[-7:], (topic, payload)]
            return
        task = self.server.take_task(payload, round_)
        self._task_bytes = len(payload)
        sent = self.sent.get(task.round)
        if sent is not None and sent[0] == task.nonce:  # lost or restarted: resend as is
            self.t.publish(self.topics.update(task.round, self.device), sent[1])
            return
        # Waiting for its model or assets, a task handles the messages that arrive; a
        # copy of itself among them (the aggregator re-sent it) would train it twice.
        if task.round in self.working:
            return
        self.working.add(task.round)
        try:
            self._work(task)
        finally:
            self.working.discard(task.round)

    def _work(self, task: messages.Task) -> None:
        if task.uplink not in uplinks.kinds():
            raise messages.MessageError(f"task.uplink: expected one of "
                                        f"{', '.join(uplinks.kinds())}, got {task.uplink!r}")
        self.opts.custom_models.check_json(task.model)  # before waiting for its frames
        got = self._wait_model(task)
        if got is None:
            log.warning("round %d: model never arrived before the deadline", task.round)
            return
        frame_bytes, fetched, self._via = got
        down = fetched + self._task_bytes
        for name, sha in task.assets.items():
            fetched = self._asset(name, str(sha), task.deadline)
            if fetched is None:
                log.warning("round %d: asset %r never arrived", task.round, name)
                return
            down += fetched
        kind = self.uplink(task.uplink)  # its module (torch, for training) loads now
        if kind.asset and not any(n.split("-")[0] == kind.asset for n in task.assets):
            raise messages.MessageError(f"task.assets: expected {kind.asset!r} with uplink "
                                        f"{task.uplink}")
        t0 = time.perf_counter()
        self._split_io = [0, 0, 0]
        update = kind.work(self, task, frame_bytes)
        self.sent = {r: b for r, b in self.sent.items() if r >= task.round - 2}
        self.sent[task.round] = (task.nonce, update)
        up = self.t.publish(self.topics.update(task.round, self.device), update)
        self.rounds_done += kind.trains
        self.history.append({"round": task.round, "uplink_bytes": up + self._split_io[0],
                             "downlink_bytes": down + self._split_io[1],
                             "exchanges": self._split_io[2],
                             "samples": _samples_seen(task, len(self.y)), "epochs": 1,
                             "passes": kind.passes,
                             "seconds": round(time.perf_counter() - t0, 4)})

    def uplink(self, kind: str) -> uplinks.Uplink:
        """The work for a task of uplink ``kind`` (a simulated attacker replaces it)."""
        return uplinks.get(kind)

    def _wait_model(self, task: messages.Task) -> tuple[bytes, int, str] | None:
        """(the model frame named by the task, bytes fetched for it, "sync" or "full"):
        rebuilt from the held model and the round's sync frame when the device holds
        the sync's base, else fetched whole (see model_sync.py)."""
        if task.sync_sha256 and self.held is not None and self.held[0] == task.base_sha256:
            # Retained, so it comes at once; if not, the whole model while there is time.
            sync = self._fetch("sync", task, task.sync_sha256,
                               min(task.deadline, time.time() + SYNC_PATIENCE))
            try:
                if sync is not None:
                    frame = REBUILT.get(self.opts.job, task.round, self.held, sync,
                                        task.sync_sha256, task.model_sha256)
                    self.held = (task.model_sha256, frame)
                    return frame, len(sync), "sync"
            except WireError as e:
                log.warning("round %d: %s; fetching the whole model", task.round, e)
        frame = self._fetch("model", task, task.model_sha256, task.deadline)
        if frame is None:
            return None
        self.held = (task.model_sha256, frame)
        return frame, len(frame), "full"

    def _fetch(self, kind: str, task: messages.Task, sha256: str, until: float
               ) -> bytes | None:
        """A retained model or sync frame of the task's round, subscribed to only while
        needed, so a device receives just the frames it uses."""
        key = (kind, task.round, task.variant)
        topic = getattr(self.topics, kind)(task.round, task.variant)
        self.t.subscribe(topic, self._enqueue)
        try:
            return self._wait_frame(lambda: self.models.get(key), sha256, until,
                                    f"{kind} {key[1:]}", lambda: self.models.pop(key, None))
        finally:
            self.t.unsubscribe(topic)

    def _asset(self, name: str, sha256: str, deadline: float) -> int | None:
        """Make sure asset ``name`` with this sha256 is decoded; returns the bytes fetched
        for it now (0 when already held), None when it never arrived."""
        if (name, sha256) in self._assets:
            return 0
        data = self._wait_frame(lambda: self.assets.get(name), sha256, deadline,
                                f"asset {name!r}", lambda: self.assets.pop(name, None))
        if data is None:
            return None
        frame = wire.decode(data, wire.Expect(kind="asset", job=self.opts.job, round=0))
        self._assets = {k: v for k, v in self._assets.items() if k[0] != name}
        self._assets[(name, sha256)] = frame.tensors
        return len(data)

    def asset(self, task: messages.Task, name: str) -> dict:
        return self._assets[(name, str(task.assets[name]))]

    def _wait_frame(self, lookup, sha256: str, deadline: float, what: str, drop
                    ) -> bytes | None:
        """A frame once it arrived with the expected sha256; other messages are handled
        meanwhile (the frame itself comes through them)."""
        while time.time() < deadline + 5:
            data = lookup()
            if data is not None:
                try:  # signed by the aggregator, and the frame the (signed) task names
                    digest = self.server.verify(data)["sha256"]
                except WireError as e:
                    digest = f"unverified: {e}"
                if digest == sha256:
                    return data
                log.warning("%s is not the one the task names (%s.. != %s..)", what,
                            digest[:40], sha256[:8])
                drop()
            try:
                topic, payload = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            self._handle(topic, payload)
            if self.stopped:
                return None
        return None

    def computing(self) -> AbstractContextManager:
        """Held while this agent computes without waiting for anyone (see ``compute``)."""
        return self.opts.compute if self.opts.compute is not None else nullcontext()

    def _build(self, variant: str = "full", config: dict | None = None):
        """The model to train for ``variant``: the task's config (a pruned or narrower
        model), else the plan's, or (SplitMix) the bases the variant names. Built once
        per variant and config; a few are kept."""
        key = (variant, json.dumps(config or {}, sort_keys=True))
        if key not in self._models:
            import torch

            from device_runtime.splitmix_variants import config_for
            from device_runtime.training.models import ModelConfig, build_model

            torch.set_num_threads(self.opts.threads)
            cfg = config_for(ModelConfig.from_json(config or self.plan.model), variant)
            if len(self._models) >= 8:
                self._models.pop(next(iter(self._models)))
            self._models[key] = build_model(cfg, self.opts.custom_models)
        return self._models[key]


def _samples_seen(task: messages.Task, n: int) -> int:
    """Samples processed this round (for the simulated compute time)."""
    return task.steps * min(task.batch_size, n) if task.steps > 0 else n * task.epochs
