"""The aggregator's side of end-to-end authenticity (docs/protocol.md, "Signatures").

The broker only routes. Everything the aggregator publishes is signed with the
job's key (``ServerTrust.signer``) and bound to the job, the round, the device it
is for and a nonce; everything a device sends is checked against that device's
key in the fleet's registry (``fedge secure init`` writes it).

- A run has a ``session`` (random): the plan and ``control`` carry it, and a device
  acts on a stop only from the session of the plan it follows.
- Each task has a ``nonce`` derived from a secret kept in the state directory and
  (job, round, device): a restarted aggregator re-sends the same task with the same
  nonce, so the device answers it once; the update must carry that nonce.
- ``gate`` runs on the transport's thread for every chunk and whole message that
  arrives, before anything is held or queued: unsigned, foreign or replayed
  messages, and chunks from a device with no open task, cost nothing more.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from device_runtime import messages, wire
from device_runtime.chunk_auth import ChunkVerifier
from device_runtime.errors import WireError
from device_runtime.keys import PublicKey, Registry, RegistryFile, Signer
from device_runtime.topics import Topics

SERVER = "server"  # the sender id of everything the aggregator publishes
SECRET_FILE = "nonce.secret"
DEVICE_KINDS = ("status", "update", "acts")  # what devices send, each signed by its key


class ServerTrust:
    """Keys, the run's session and task nonces, and the checks of what devices send."""

    def __init__(self, job: str, signer: Signer, registry: Registry | RegistryFile,
                 state_dir: Path | None = None):
        self.job, self.signer = job, signer
        self.registry = registry if isinstance(registry, RegistryFile) else \
            RegistryFile(None, registry)
        self.session = secrets.token_hex(8)
        self._secret = _secret(state_dir)
        self.open_tasks: dict[str, tuple[int, str]] = {}  # device -> (round, nonce) open
        self.last_status: dict[str, float] = {}  # device -> ts of its newest status
        self.chunks = ChunkVerifier()  # one signature per chunked update, not per chunk

    # --- what the aggregator sends -------------------------------------------------
    def nonce(self, round_: int, device: str) -> str:
        """The task nonce: the same for the same job, round and device across restarts."""
        msg = f"{self.job}/{round_}/{device}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()[:32]

    def seal(self, msg, round_: int = 0, nonce: str = "", to: str = "") -> bytes:
        return messages.seal(msg, self.job, SERVER, self.signer, round_, nonce, to)

    def frame(self, frame: wire.Frame) -> bytes:
        return wire.encode(frame, signer=self.signer)

    # --- what devices send -----------------------------------------------------------
    def key_of(self, device: str) -> PublicKey:
        key = self.registry.get(device)
        if key is None:
            raise WireError(f"device: expected one with a key in the fleet's registry, got "
                            f"{device!r} (add it with fedge secure add)")
        return key

    def status(self, device: str, payload: bytes) -> messages.Status:
        """A device's status, signed by its key, newer than the last one taken (a
        replayed "online" cannot bring back an old profile or sample count)."""
        sealed = messages.unseal(messages.Status, payload, self.key_of(device), self.job,
                                 sender=device)
        status = sealed.msg
        if status.device != device:
            raise messages.MessageError(f"status.device: expected {device!r}, got "
                                        f"{status.device!r}")
        last = self.last_status.get(device)
        # Equal is the same status again (a retained one after a resubscribe).
        if status.state != "offline" and last is not None and status.ts < last:
            raise WireError(f"status.ts: expected {last:.3f} or newer (the last status "
                            f"taken), got {status.ts:.3f} (replayed)")
        if status.state != "offline":
            self.last_status[device] = status.ts
        return status

    def update(self, payload: bytes, expect: wire.Expect, device: str) -> wire.Frame:
        """An update of ``device``'s open task, signed by its key with the task's nonce."""
        return wire.decode(payload, expect, key=self.key_of(device))

    def gate(self, topics: Topics):
        """The transport gate: cheap checks before a message is held or queued."""
        def check(topic: str, data: bytes, chunk: bool) -> dict | None:
            """Refuse (WireError) what must not be held; a chunk's header is returned
            for the reassembler (which hashes its body)."""
            where = topics.parse(topic)
            kind, device = where.get("kind"), where.get("device")
            if kind not in DEVICE_KINDS or device is None:
                return None  # the aggregator's own topics (workers') are checked where handled
            if kind != "status" and not (chunk or data[:4] == wire.MAGIC):
                raise WireError(f"{kind}: expected a frame (magic FDG1), got {len(data)} "
                                "other bytes")
            if kind in ("update", "acts"):
                opened = self.open_tasks.get(device)
                if opened is None or opened[0] != where.get("round"):
                    raise WireError(f"{kind}: {device!r} has no open task in round "
                                    f"{where.get('round')}")
            if not (chunk or kind == "status"):
                return None  # a whole frame: the handler checks its signature
            key, expect = self.key_of(device), wire.Expect(job=self.job)
            # A chunk's body is hashed by the reassembler's decode, right after.
            header = self.chunks.verify(topic, data, key, expect) if chunk else \
                wire.verify(data, key, expect)
            if header["device"] != device:
                raise WireError(f"header.device: expected {device!r} (the topic's), "
                                f"got {header['device']!r}")
            return header if chunk else None
        return check


def _secret(state_dir: Path | None) -> bytes:
    """The task-nonce secret: kept with the job's state (created once, 0600), so a
    restarted aggregator derives the same nonces; random per process without a state."""
    if state_dir is None:
        return secrets.token_bytes(32)
    path = Path(state_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    data = path.read_bytes()
    if len(data) != 32:
        raise WireError(f"{path}: expected a 32-byte secret, got {len(data)} bytes")
    return data
