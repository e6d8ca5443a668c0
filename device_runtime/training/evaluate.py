"""A device's evaluation for a task (uplink "evaluate"): score the task's model on the
held-out part of its local data and answer with loss, accuracy and sample count.

The held-out part is the one ``device_runtime.data.holdout_split`` set aside when the
plan asked for it (``plan.train["holdout"]``): the device never trains on it, so the
score is the model's on data it has not seen. The answer is an update frame with no
tensors, its figures in the signed meta, bound to the task's nonce like any update.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from device_runtime import messages, wire
from device_runtime.training.local import load_weights
from device_runtime.uplinks import Uplink


@torch.no_grad()
def score(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1024) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on ``x, y`` (0, 0 on no samples)."""
    if len(y) == 0:
        return 0.0, 0.0
    model.eval()
    loss, right = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32))
        yb = torch.from_numpy(y[i:i + batch_size])
        logits = model(xb)
        loss += float(F.cross_entropy(logits, yb, reduction="sum"))
        right += int((logits.argmax(1) == yb).sum())
    return loss / len(y), right / len(y)


def _evaluate(agent, task: messages.Task, frame_bytes: bytes) -> bytes:
    if agent.plan is None:
        raise messages.MessageError("task arrived before the plan")
    model = agent._build(task.variant, task.model)
    spec = agent.plan.variants.get(task.variant)
    if spec is None:
        raise messages.MessageError(f"task.variant: expected one of the plan's "
                                    f"({', '.join(agent.plan.variants)}), got {task.variant!r}")
    frame = wire.decode(frame_bytes, wire.Expect(
        kind="model", job=agent.opts.job, round=task.round,
        tensors={k: wire.TensorSpec("float32", tuple(s)) for k, s in spec["tensors"].items()}))
    load_weights(model, frame.tensors)
    loss, acc = score(model, agent.eval_x, agent.eval_y)
    meta = {"samples": int(len(agent.eval_y)), "loss": round(loss, 6),
            "accuracy": round(acc, 6), "variant": task.variant, "evaluate": True}
    return wire.encode(wire.Frame("update", agent.opts.job, task.round, agent.device, "eval",
                                  {}, {}, meta, nonce=task.nonce), signer=agent.key)


EVALUATE = Uplink(_evaluate, passes=1, trains=False)
