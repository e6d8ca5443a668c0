"""A device's local training for a task (uplinks "weights" and "logits"; dpfl's
"split" reuses ``train_task``): read the model frame, train, code and sign the
update. Torch is imported here, never by the agent itself."""
from __future__ import annotations

import importlib
from contextlib import nullcontext

from typing import Callable

from device_runtime import codecs, messages, wire
from device_runtime.codecs import CodecContext
from device_runtime.training.local import (
    LocalResult,
    LocalTrainOptions,
    load_weights,
    predict_logits,
    train_local,
    weights_of,
)
from device_runtime.uplinks import Uplink

# (model, agent, task, local options) -> the training's result
Fit = Callable[..., LocalResult]
# (agent, task, model, result, model frame) -> (tensors to send, the codec's reference)
Answer = Callable[..., tuple[dict, dict | None]]


def train_task(agent, task: messages.Task, frame_bytes: bytes, model, shapes: dict,
               fit: Fit, answer: Answer, merge: bool = False, gated: bool = False) -> bytes:
    """Load the frame (holding ``shapes``; ``merge``: only part of the model) into
    ``model``, train it with ``fit`` (or the codec's own trainer), and sign what
    ``answer`` makes of it as the update. ``gated``: the loading and training, and the
    coding, hold the agent's compute slot (``agent.computing()``); only for a ``fit``
    that waits for nobody (split learning waits for the server) and never around
    ``answer`` (colluding attackers wait for each other there)."""
    slot = agent.computing if gated else nullcontext
    with slot():
        res, frame, codec = _load_and_train(agent, task, frame_bytes, model, shapes, fit,
                                            merge)
    sent, reference = answer(agent, task, model, res, frame)
    ctx = CodecContext(round=task.round, seed=task.seed, reference=reference,
                       device=agent.device)
    with slot():
        tensors, params = codec.encode(sent, ctx)
        return wire.encode(wire.Frame(
            "update", agent.opts.job, task.round, agent.device, task.codec, tensors, params,
            {"samples": res.samples, "loss": round(res.loss, 6),
             "train_seconds": messages.fixed_seconds(res.seconds), "variant": task.variant,
             "via": agent._via}, nonce=task.nonce), signer=agent.key)


def _load_and_train(agent, task: messages.Task, frame_bytes: bytes, model, shapes: dict,
                    fit: Fit, merge: bool):
    """(the training's result, the decoded model frame, the task's codec)."""
    frame = wire.decode(frame_bytes, wire.Expect(
        kind="model", job=agent.opts.job, round=task.round,
        tensors={k: wire.TensorSpec("float32", s) for k, s in shapes.items()}))
    load_weights(model, {**weights_of(model), **frame.tensors} if merge else frame.tensors)
    codec = codecs.get(task.codec)
    local = LocalTrainOptions(task.epochs, task.batch_size, task.lr, seed=task.seed,
                              steps=task.steps)
    # A codec that trains its own way names its trainer. The task names only the codec,
    # which codecs.get takes from the registry (unknown names refused); the trainer's
    # path is the registered class's, never anything from the network.
    trainer = getattr(codec, "trainer", "")
    if trainer:
        module, _, name = trainer.partition(":")
        res = getattr(importlib.import_module(module), name)(
            codec, model, agent.x, agent.y, local, task.seed, agent.device)
    else:
        res = fit(model, agent, task, local)
    return res, frame, codec


def _fit(model, agent, task: messages.Task, local: LocalTrainOptions) -> LocalResult:
    from device_runtime.training.splitmix import SplitMixNet, train_bases

    if isinstance(model, SplitMixNet):  # only the bases it holds
        return train_bases(model, agent.x, agent.y, local)
    return train_local(model, agent.x, agent.y, local)


def send_weights(agent, task, model, res: LocalResult, frame) -> tuple[dict, dict | None]:
    return res.weights, frame.tensors


def _send_logits(agent, task, model, res: LocalResult, frame) -> tuple[dict, dict | None]:
    """FedMD: the model's answers on the public split, not the model."""
    return {"logits": predict_logits(model, agent.asset(task, "public")["x"])}, None


def train_uplink(answer: Answer):
    """The uplink work that trains the task's model and sends what ``answer`` makes of
    it (the device's own: its weights or logits; a simulated attacker's: poisoned)."""
    def work(agent, task: messages.Task, frame_bytes: bytes) -> bytes:
        if agent.plan is None:
            raise messages.MessageError("task arrived before the plan")
        model = agent._build(task.variant, task.model)
        if task.variant in agent.plan.variants:
            shapes = {k: tuple(v) for k, v in agent.plan.variants[task.variant]["tensors"].items()}
        else:  # a variant the model config defines (SplitMix bases): the model says
            shapes = {k: tuple(v.shape) for k, v in weights_of(model).items()}
        return train_task(agent, task, frame_bytes, model, shapes, _fit, answer, gated=True)
    return work


WEIGHTS = Uplink(train_uplink(send_weights))
LOGITS = Uplink(train_uplink(_send_logits), asset="public")
