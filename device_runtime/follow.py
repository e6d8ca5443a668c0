"""What a device takes from the aggregator: only messages signed by the aggregator's key
and bound to this job, this device, the plan's session and a fresh round.

``ServerMessages`` holds the device's view of the run (the plan it follows and the
newest task round of its session) and turns each received payload into a checked
message or an ``UnauthenticatedError``. A refused message is counted and logged (the
first of each kind and reason, then every 100th), never answered: answering each forged message
would let a flood of them drive the device's and the aggregator's traffic.
"""
from __future__ import annotations

import logging

from device_runtime import messages, wire
from device_runtime.chunk_auth import ChunkVerifier
from device_runtime.errors import UnauthenticatedError, WireError
from device_runtime.keys import PublicKey

log = logging.getLogger("fedge.device")
SERVER = "server"


class ServerMessages:
    def __init__(self, job: str, device: str, server_key: PublicKey):
        self.job, self.device, self.key = job, device, server_key
        self.chunks = ChunkVerifier()
        self.plan: messages.Plan | None = None
        self.round_seen = 0  # the newest task round taken in the plan's session
        self.refused: dict[str, int] = {}  # kind -> messages refused
        self._logged: set[tuple[str, str]] = set()

    def unseal(self, cls, payload: bytes, **binding) -> messages.Sealed:
        try:
            return messages.unseal(cls, payload, self.key, self.job, sender=SERVER, **binding)
        except messages.MessageError:
            raise  # signed by the aggregator, but malformed: a bug worth reporting
        except WireError as e:
            raise UnauthenticatedError(str(e)) from None

    def verify(self, data: bytes, expect: wire.Expect | None = None) -> dict:
        """The header of a frame signed by the aggregator for this job."""
        try:
            return wire.verify(data, self.key, expect or wire.Expect(job=self.job))
        except WireError as e:
            raise UnauthenticatedError(str(e)) from None

    def take_plan(self, payload: bytes, check=None) -> messages.Plan:
        """The plan to follow: the newest the device has seen (a replayed older one is
        refused), passing ``check(plan.model)``; a new session starts the task rounds
        afresh."""
        plan = self.unseal(messages.Plan, payload).msg
        if check is not None:
            check(plan.model)
        if self.plan is not None and plan.issued < self.plan.issued:
            raise UnauthenticatedError(f"plan.issued: expected at least {self.plan.issued:.3f}"
                                       f" (the plan followed), got {plan.issued:.3f} (older)")
        if self.plan is None or plan.session != self.plan.session:
            self.round_seen = 0
        self.plan = plan
        return plan

    def take_control(self, payload: bytes) -> messages.Control:
        """A control message of the followed plan's session (the caller has a plan)."""
        return self.unseal(messages.Control, payload, nonce=self.plan.session).msg

    def take_heartbeat(self, payload: bytes) -> messages.Heartbeat | None:
        """The aggregator's heartbeat of the followed plan's session (None before a plan:
        nothing to bind it to yet)."""
        if self.plan is None:
            return None
        return self.unseal(messages.Heartbeat, payload, nonce=self.plan.session).msg

    def take_task(self, payload: bytes, round_: int) -> messages.Task:
        """A task for this device, of round ``round_`` (the topic's), of the plan's
        session, and no older than one already taken."""
        sealed = self.unseal(messages.Task, payload, round_=round_, to=self.device)
        task = sealed.msg
        if task.device != self.device or task.round != round_ or \
                task.nonce != sealed.frame.nonce or task.session != self.plan.session:
            raise UnauthenticatedError(
                f"task: expected round {round_} for {self.device!r} in session "
                f"{self.plan.session}, got round {task.round} for {task.device!r} in "
                f"session {task.session!r}")
        if task.round < self.round_seen:
            raise UnauthenticatedError(f"task.round: expected at least {self.round_seen}, "
                                       f"got {task.round} (replayed)")
        self.round_seen = task.round
        return task

    def gate(self, topic: str, data: bytes, chunk: bool) -> dict | None:
        """On the transport thread: a chunk must be signed by the aggregator before it
        is held (a flood of forged chunks costs one signature check each; an honest
        message's chunks after its chunk 0, a hash each: chunk_auth.py). Its header is
        returned for the reassembler, which hashes its body right after."""
        if chunk:
            return self.chunks.verify(topic, data, self.key, wire.Expect(job=self.job))
        return None

    def count(self, kind: str, topic: str, e: Exception) -> None:
        """Count a refusal; log the first of each kind and reason (the field it names),
        then every 100th of the kind."""
        n = self.refused[kind] = self.refused.get(kind, 0) + 1
        reason = (kind, str(e).split(":")[0])
        if reason not in self._logged or n % 100 == 0:
            self._logged.add(reason)
            log.warning("refused %s #%d on %s: %s", kind, n, topic, e)
