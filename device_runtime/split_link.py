"""Split learning's device side of the batch exchange (dpfl).

Each minibatch's activations at the cut go to the server, which answers with the
loss gradient for them. An unanswered batch is sent again every few seconds (the
server answers a repeat from its cache, untrained), and messages that arrive
meanwhile are handled by the agent, except new tasks, which wait for the round
to end.
"""
from __future__ import annotations

import queue
import time

import numpy as np

from device_runtime import messages, wire
from device_runtime.errors import FedgeError, WireError

RESEND_SECONDS = 5.0  # an unanswered batch is sent again after this long


def exchanger(agent, task: messages.Task):
    """dpfl's link to the server: send one batch's activations, wait for their gradient
    (resent every few seconds; the server answers a repeat from its cache)."""
    attempt = f"{time.time_ns():x}"

    def exchange(step: int, acts: np.ndarray, labels: np.ndarray):
        frame = wire.encode(wire.Frame("acts", agent.opts.job, task.round, agent.device,
                                       "fp32", {"acts": acts, "labels": labels},
                                       meta={"attempt": attempt, "step": step},
                                       nonce=task.nonce), signer=agent.opts.key)
        while time.time() < task.deadline + 5 and not agent.stopped:
            agent._split_io[0] += agent.t.publish(
                agent.topics.acts(task.round, agent.device), frame)
            got = _wait_grad(agent, task, attempt, step, time.time() + RESEND_SECONDS)
            if got is not None:
                agent._split_io[2] += 1
                return got
        raise FedgeError(f"round {task.round}: no gradient for batch {step} before the "
                         "deadline")
    return exchange


def _wait_grad(agent, task: messages.Task, attempt: str, step: int, until: float):
    """(grad, loss) for this batch once it arrives; other messages are handled
    meanwhile, tasks are kept for after the round."""
    while time.time() < until:
        data = agent.grads.pop(task.round, None)
        if data is not None:
            frame = wire.decode(data, wire.Expect(kind="grad", job=agent.opts.job,
                                                  round=task.round, nonce=task.nonce,
                                                  to=agent.device), key=agent.opts.server_key)
            if frame.meta.get("attempt") == attempt and frame.meta.get("step") == step:
                agent._split_io[1] += len(data)
                grad = frame.tensors.get("grad")
                if grad is None or grad.dtype != np.float32 or not np.isfinite(grad).all():
                    raise WireError("grad: expected a finite float32 tensor 'grad'")
                return grad, float(frame.meta.get("loss", 0.0))
            continue  # a stale reply (an earlier attempt or a resent batch)
        try:
            topic, payload = agent.events.get(timeout=0.2)
        except queue.Empty:
            continue
        if agent.topics.parse(topic)["kind"] == "task":
            agent._deferred.append((topic, payload))
        else:
            agent._handle(topic, payload)
        if agent.stopped:
            return None
    return None
