"""Split learning's batch exchange on the server: activations in, the loss gradient out.

dpfl trains the model's tail on the server one minibatch at a time, while the
device waits; its strategy offers this as its side channel
(``Strategy.side_channel``), answered by the service without knowing what it is.
A batch seen before (a QoS 1 redelivery, or the device resending
after a timeout) must get the same reply without training the tail twice, so
the last reply per device is kept, keyed by (round, attempt, step).

The server's model takes one step per batch, so the order it takes the batches in
is part of the result. In arrival order (``fedge serve``'s default) that order is
whichever device's thread or radio was quicker, and no two runs agree. In
**lockstep** (``fedge simulate``'s default) a batch is held until every device still
training (assigned, not yet reported, online) has one held, and the held batches are
trained in device order: each round is then the same sequence of steps on every run.
It costs wall time only (each step waits for the slowest device), not the simulated
time, which comes from the profiles. A device that keeps the others waiting
``STALL_SECONDS`` is left out of the count until its next batch arrives.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from broker_server.records import server_time
from broker_server.trust import SERVER, ServerTrust
from device_runtime import messages, wire
from device_runtime.errors import WireError

log = logging.getLogger("fedge.server")

# (round, device, tensors, batch size) -> (loss gradient w.r.t. the activations, loss)
OnBatch = Callable[[int, str, dict, int], tuple[np.ndarray, float]]
# (device, tensors, batch size) -> None, or WireError: a batch checked as it arrives
CheckBatch = Callable[[str, dict, int], None]
STALL_SECONDS = 10.0  # lockstep: the longest a held batch waits for the other devices'


class BatchReplies:
    """The last gradient reply per device, answered again for a repeated batch; in
    ``lockstep``, the batches held for their turn."""

    def __init__(self, job: str, on_batch: OnBatch, check: CheckBatch | None = None,
                 lockstep: bool = False):
        self.job, self.on_batch, self.check, self.lockstep = job, on_batch, check, lockstep
        self._last: dict[str, tuple[tuple, bytes]] = {}
        # device -> (key, held since, tensors, task); one per device: it waits for a reply
        self._held: dict[str, tuple[tuple, float, dict, messages.Task]] = {}
        self._late: set[str] = set()  # kept the others waiting: not counted until it sends
        self._round = 0  # the round ``_late`` is about

    def answer(self, round_: int, device: str, payload: bytes, task: messages.Task,
               trust: ServerTrust) -> bytes | None:
        """The grad frame for one acts frame, signed for ``device`` with its task's
        nonce, or None when it is held for its turn (``release``); WireError on a
        malformed, unsigned or foreign one."""
        frame = wire.decode(payload, wire.Expect(kind="acts", job=self.job, round=round_,
                                                 devices=frozenset([device]), codec="fp32",
                                                 nonce=task.nonce), key=trust.key_of(device))
        key = (round_, str(frame.meta.get("attempt")), frame.meta.get("step"))
        if not isinstance(key[2], int) or isinstance(key[2], bool) or key[2] < 0:
            raise WireError(f"meta.step: expected an int >= 0, got {key[2]!r}")
        last = self._last.get(device)
        if last is not None and last[0] == key:
            return last[1]
        if self.check is not None:  # refused now, not when its turn comes
            self.check(device, frame.tensors, task.batch_size)
        if not self.lockstep:
            return self._train(device, key, frame.tensors, task, trust)
        held = self._held.get(device)
        if held is None or held[0] != key:  # a resent batch keeps its place
            self._held[device] = (key, time.monotonic(), frame.tensors, task)
        self._late.discard(device)
        return None

    def release(self, round_: int, training: set[str], trust: ServerTrust,
                now: float | None = None) -> list[tuple[str, bytes]]:
        """Lockstep: (device, grad frame) for every held batch, trained in device order,
        once each device in ``training`` has one held (or the oldest has waited
        ``STALL_SECONDS``); else nothing yet."""
        if round_ != self._round:  # a round closed past its deadline leaves batches held
            self._held = {d: h for d, h in self._held.items() if h[0][0] == round_}
            self._late, self._round = set(), round_
        if not self._held:
            return []
        now = time.monotonic() if now is None else now
        expected = training - self._late
        if not expected <= set(self._held):
            if now - min(h[1] for h in self._held.values()) < STALL_SECONDS:
                return []
            late = expected - set(self._held)
            log.warning("round %d: %s sent no batch in %gs; the others go on without them",
                        round_, ", ".join(sorted(late)), STALL_SECONDS)
            self._late |= late
        out = []
        for device in sorted(self._held):
            key, _, tensors, task = self._held.pop(device)
            try:
                out.append((device, self._train(device, key, tensors, task, trust)))
            except Exception:  # checked on arrival: a bug, which must not stop the round
                log.exception("round %d: training %s's batch %s", round_, device, key[2])
        return out

    def _train(self, device: str, key: tuple, tensors: dict, task: messages.Task,
               trust: ServerTrust) -> bytes:
        grad, loss = self.on_batch(key[0], device, tensors, task.batch_size)
        reply = trust.frame(wire.Frame("grad", self.job, key[0], SERVER, "fp32", {"grad": grad},
                                       meta={"attempt": key[1], "step": key[2],
                                             "loss": round(loss, 6)}, nonce=task.nonce,
                                       to=device))
        self._last[device] = (key, reply)
        return reply


def on_acts(agg, where: dict, payload: bytes) -> None:
    """The aggregator's handling of a device's mid-round message to the strategy's side
    channel: answered now, or (lockstep) held and answered with the others."""
    rs, device, r = agg.round, where["device"], where["round"]
    if rs is None or r != rs.number or device not in rs.assigned or device in rs.accepted:
        raise WireError(f"round: {device!r} has no open split task in round {r}")
    if agg.side is None:
        raise WireError(f"acts: strategy {agg.strategy.name} takes no per-batch activations")
    with server_time(rs):  # the tail's step on this batch is the server's compute
        reply = agg.side.answer(r, device, payload, rs.assigned[device], agg.trust)
    rs.uplink_bytes += len(payload)
    if reply is not None:
        rs.downlink_bytes += agg.t.publish(agg.topics.grad(r, device), reply)
    release(agg)


def release(agg) -> None:
    """Send the replies the side channel has ready (lockstep: a step of every device);
    called whenever a message was handled."""
    rs = agg.round
    if agg.side is None or rs is None or not getattr(agg.side, "lockstep", False):
        return
    training = {d for d in rs.assigned if d not in rs.accepted and d not in rs.refused
                and getattr(agg.devices.get(d), "state", "") == "online"}
    with server_time(rs):
        ready = agg.side.release(rs.number, training, agg.trust)
    for device, reply in ready:
        rs.downlink_bytes += agg.t.publish(agg.topics.grad(rs.number, device), reply)
