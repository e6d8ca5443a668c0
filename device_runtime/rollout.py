"""A device's side of a staged rollout (``fedge rollout``): take a signed command,
fetch the new export over MQTT, verify it, switch to it atomically, report.

A command (``messages.Rollout``, retained on ``rollout/<device>``) is signed by the
operator's key (the aggregator's: the device's ``--trust``), addressed to this
device, bound to the job, the rollout's id (nonce) and the target version (round),
and no older (``issued``) than the last one taken, which the store keeps across
restarts. ``install``: the release's manifest frame (its content sha256 named by
the command), then the manifest's own signature, job and version (the ledger of
``device_runtime.rollback``), then each artifact of this profile fetched as a
signed frame and checked against the manifest's sha256; the new version is
loaded in ONNX Runtime and timed *before* the switch, so a version that does not
load is never switched to and the device keeps running the one it had.
``rollback``: back to the kept previous version (the operator's signed word
lets the ledger go back). Either way the result goes out in the device's status
(``versions.artifact_version`` and ``versions.rollout``) and a failure in its
``error``; the device stays online.
"""
from __future__ import annotations

import hashlib
import logging
import queue
import time

import numpy as np

from device_runtime import messages, wire
from device_runtime.artifact_store import ArtifactStore
from device_runtime.errors import ExportRefusedError, FedgeError, UnauthenticatedError

log = logging.getLogger("fedge.device")
FETCH_TIMEOUT = 120.0  # seconds for one release file to arrive
LIMITS = wire.Limits(max_tensors=2)


def latency_ms(predictor, runs: int = 5, batch: int = 16) -> float:
    """Per-sample latency of ``predictor`` on zeros: the best of ``runs`` batches."""
    x = np.zeros((batch, *[d if isinstance(d, int) else 1 for d in predictor.sample_shape]),
                 np.float32)
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        predictor.predict_logits(x)
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000 / batch, 5)


class DeviceRollout:
    def __init__(self, agent, store: ArtifactStore):
        self.agent, self.store = agent, store
        self.topics = agent.topics

    def handle(self, payload: bytes) -> None:
        sealed = self.agent.server.unseal(messages.Rollout, payload, to=self.agent.device)
        cmd = sealed.msg
        if sealed.frame.nonce != cmd.rollout or sealed.frame.round != cmd.version:
            raise UnauthenticatedError(f"rollout: expected nonce {cmd.rollout!r} and round "
                                       f"{cmd.version}, got {sealed.frame.nonce!r} and "
                                       f"{sealed.frame.round}")
        if cmd.action not in ("install", "rollback"):
            raise messages.MessageError(f"rollout.action: expected install or rollback, "
                                        f"got {cmd.action!r}")
        last = self.store.issued()
        if cmd.issued < last:
            raise UnauthenticatedError(f"rollout.issued: expected {last:.3f} or newer (the "
                                       f"last command taken), got {cmd.issued:.3f} (replayed)")
        self.store.take(cmd.issued)
        try:
            ms, before = self._apply(cmd)
        except FedgeError as e:
            log.warning("rollout %s to version %d failed: %s", cmd.rollout, cmd.version, e)
            self._report(cmd, False, error=f"rollout {cmd.rollout} v{cmd.version}: {e}")
            return
        self._report(cmd, True, ms, before)

    def _apply(self, cmd: messages.Rollout) -> tuple[float, float]:
        """(latency of the version now run, of the one before), in ms per sample."""
        from device_runtime.predictor import Predictor
        from device_runtime.rollback import ExportPolicy

        o = self.agent.opts
        old = self.store.current
        before = latency_ms(Predictor.from_manifest(self.store.folder(old), o.profile)) \
            if old is not None else 0.0
        if old == cmd.version:  # already there (the same command again): just report
            return before, before
        if cmd.action == "rollback":
            if cmd.replaces != old or self.store.previous != cmd.version:
                raise ExportRefusedError(f"rollback to {cmd.version}: this device runs "
                                         f"{old} (previous {self.store.previous}), not "
                                         f"{cmd.replaces}")
            folder = self.store.folder(cmd.version)
            policy = ExportPolicy(o.job, allow_rollback=True)  # the operator's signed word
        else:
            folder = self._fetch_release(cmd)
            policy = ExportPolicy(o.job, o.allow_rollback)
        pred = Predictor.from_manifest(folder, o.profile, trust=o.trust, policy=policy)
        ms = latency_ms(pred)
        if cmd.action == "install":
            self.store.commit(folder, cmd.version)
        self.store.switch(cmd.version)
        return ms, before

    def _fetch_release(self, cmd: messages.Rollout):
        """The release's files for this profile in a staged folder, each verified."""
        from device_runtime.manifest import load_manifest
        from device_runtime.rollback import ExportPolicy, check_binding

        o = self.agent.opts
        frame = self._frame(self.topics.release(cmd.version, "manifest"), cmd.version,
                            ("manifest", "sig"))
        if _sha(frame.tensors["manifest"]) != cmd.manifest_sha256:
            raise ExportRefusedError(f"release {cmd.version}: the manifest is not the one "
                                     f"the command names ({cmd.manifest_sha256[:12]}...)")
        staged = self.store.staging()
        self.store.write(staged, {"manifest.json": frame.tensors["manifest"].tobytes(),
                                  "manifest.json.sig": frame.tensors["sig"].tobytes()})
        m = load_manifest(staged, trust=o.trust)  # its signature, before it is parsed
        check_binding(m, ExportPolicy(o.job, o.allow_rollback))
        if m.version != cmd.version:
            raise ExportRefusedError(f"release {cmd.version}: its manifest is version "
                                     f"{m.version}")
        for a in m.device(o.profile).artifacts:
            data = self._frame(self.topics.release(cmd.version, a.sha256), cmd.version,
                               ("data",))
            body = data.tensors["data"].tobytes()
            if hashlib.sha256(body).hexdigest() != a.sha256:
                raise ExportRefusedError(f"release {cmd.version}: artifact {a.path} fails "
                                         "the manifest's sha256")
            self.store.write(staged, {a.path: body})
        return staged

    def _frame(self, topic: str, version: int, names: tuple[str, ...]) -> wire.Frame:
        """A retained release frame, signed by the operator, subscribed to while needed."""
        got: queue.Queue = queue.Queue()
        self.agent.t.subscribe(topic, lambda t, p: got.put(p))
        try:
            payload = got.get(timeout=FETCH_TIMEOUT)
        except queue.Empty:
            raise ExportRefusedError(f"{topic}: did not arrive within "
                                     f"{FETCH_TIMEOUT:g}s") from None
        finally:
            self.agent.t.unsubscribe(topic)
        try:
            return wire.decode(payload, wire.Expect(
                kind="release", job=self.agent.opts.job, round=version,
                tensors={n: wire.TensorSpec("uint8", (None,)) for n in names}), LIMITS,
                self.agent.opts.server_key)
        except FedgeError as e:
            raise ExportRefusedError(f"{topic}: {e}") from None

    def _report(self, cmd: messages.Rollout, ok: bool, ms: float = 0.0, before: float = 0.0,
                error: str = "") -> None:
        self.agent.runtime["artifact_version"] = self.store.current or 0
        self.agent.runtime["rollout"] = {
            "id": cmd.rollout, "action": cmd.action, "version": cmd.version, "ok": ok,
            "latency_ms": ms, "previous_latency_ms": before, "error": error}
        self.agent.announce("online", error=error)


def _sha(arr: np.ndarray) -> str:
    return hashlib.sha256(arr.tobytes()).hexdigest()


def store_of(agent) -> ArtifactStore:
    """The device's store of installed versions (``--models-dir``, default
    ``$FEDGE_HOME/models/<job>/<device>``)."""
    from device_runtime.rollback import fedge_home

    return ArtifactStore(agent.opts.models_dir or
                         fedge_home() / "models" / agent.opts.job / agent.device)


def adopt_export(agent) -> None:
    """``DeviceAgent.check_export``: verify the export (agent.opts.manifest, .trust) as
    the store's current version; on failure the refusal becomes the retained status
    (state "error", also after a reconnect) and is raised."""
    from device_runtime.errors import RefusedError
    from device_runtime.preflight import check_device
    from device_runtime.rollback import ExportPolicy

    policy = ExportPolicy(agent.opts.job, agent.opts.allow_rollback)
    try:
        store = store_of(agent)
        # A version a rollout installed since wins over an older one it was started with.
        manifest = store.newest(agent.opts.manifest)
        checked = check_device(manifest, agent.opts.profile, agent.opts.trust,
                               agent.opts.threads, policy)
        store.adopt(manifest, agent.opts.profile)
    except FedgeError as e:
        refusal = RefusedError(e)  # the caller prints it; the status carries it
        agent.t.on_connect = lambda: agent.announce("error", str(refusal))
        agent.announce("error", str(refusal))
        raise refusal from None
    agent.runtime = {**checked.versions(), "artifact_version": checked.version}
    agent.rollouts = DeviceRollout(agent, store)
