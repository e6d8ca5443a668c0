"""Split learning's batch exchange on the server: activations in, the loss gradient out.

dpfl trains the model's tail on the server one minibatch at a time, while the
device waits; its strategy offers this as its side channel
(``Strategy.side_channel``), answered by the service without knowing what it is.
A batch seen before (a QoS 1 redelivery, or the device resending
after a timeout) must get the same reply without training the tail twice, so
the last reply per device is kept, keyed by (round, attempt, step).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from broker_server.trust import SERVER, ServerTrust
from device_runtime import messages, wire
from device_runtime.errors import WireError


# (round, device, tensors, batch size) -> (loss gradient w.r.t. the activations, loss)
OnBatch = Callable[[int, str, dict, int], tuple[np.ndarray, float]]


class BatchReplies:
    """The last gradient reply per device, answered again for a repeated batch."""

    def __init__(self, job: str, on_batch: OnBatch):
        self.job, self.on_batch = job, on_batch
        self._last: dict[str, tuple[tuple, bytes]] = {}

    def answer(self, round_: int, device: str, payload: bytes, task: messages.Task,
               trust: ServerTrust) -> bytes:
        """The grad frame for one acts frame, signed for ``device`` with its task's
        nonce (WireError on a malformed, unsigned or foreign one)."""
        batch_size, nonce = task.batch_size, task.nonce
        frame = wire.decode(payload, wire.Expect(kind="acts", job=self.job, round=round_,
                                                 devices=frozenset([device]), codec="fp32",
                                                 nonce=nonce), key=trust.key_of(device))
        key = (round_, str(frame.meta.get("attempt")), frame.meta.get("step"))
        if not isinstance(key[2], int) or isinstance(key[2], bool) or key[2] < 0:
            raise WireError(f"meta.step: expected an int >= 0, got {key[2]!r}")
        last = self._last.get(device)
        if last is not None and last[0] == key:
            return last[1]
        grad, loss = self.on_batch(round_, device, frame.tensors, batch_size)
        reply = trust.frame(wire.Frame("grad", self.job, round_, SERVER, "fp32", {"grad": grad},
                                       meta={"attempt": key[1], "step": key[2],
                                             "loss": round(loss, 6)}, nonce=nonce, to=device))
        self._last[device] = (key, reply)
        return reply
