"""Split learning's batch exchange on the server: activations in, the loss gradient out.

dpfl trains the model's tail on the server one minibatch at a time, while the
device waits. A batch seen before (a QoS 1 redelivery, or the device resending
after a timeout) must get the same reply without training the tail twice, so
the last reply per device is kept, keyed by (round, attempt, step).
"""
from __future__ import annotations

from broker_server.trust import SERVER, ServerTrust
from device_runtime import wire
from device_runtime.errors import WireError


class BatchReplies:
    """The last gradient reply per device, answered again for a repeated batch."""

    def __init__(self, job: str):
        self.job = job
        self._last: dict[str, tuple[tuple, bytes]] = {}

    def reply(self, strategy, round_: int, device: str, payload: bytes, batch_size: int,
              trust: ServerTrust, nonce: str) -> bytes:
        """The grad frame for one acts frame, signed for ``device`` with its task's
        ``nonce`` (WireError on a malformed, unsigned or foreign one)."""
        frame = wire.decode(payload, wire.Expect(kind="acts", job=self.job, round=round_,
                                                 devices=frozenset([device]), codec="fp32",
                                                 nonce=nonce), key=trust.key_of(device))
        key = (round_, str(frame.meta.get("attempt")), frame.meta.get("step"))
        if not isinstance(key[2], int) or isinstance(key[2], bool) or key[2] < 0:
            raise WireError(f"meta.step: expected an int >= 0, got {key[2]!r}")
        last = self._last.get(device)
        if last is not None and last[0] == key:
            return last[1]
        grad, loss = strategy.on_batch(round_, device, frame.tensors, batch_size)
        reply = trust.frame(wire.Frame("grad", self.job, round_, SERVER, "fp32", {"grad": grad},
                                       meta={"attempt": key[1], "step": key[2],
                                             "loss": round(loss, 6)}, nonce=nonce, to=device))
        self._last[device] = (key, reply)
        return reply
