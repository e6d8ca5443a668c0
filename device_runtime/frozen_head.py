"""EcoFed's device work (uplink "acts"): run the frozen head (the ONNX asset
``head-<cut>``) in onnxruntime on every local sample and send the activations,
quantized by the task's codec, with their labels. No torch on this path."""
from __future__ import annotations

import numpy as np

from device_runtime import codecs, messages, wire
from device_runtime.codecs import CodecContext
from device_runtime.uplinks import Uplink


def activations(agent, task: messages.Task, frame_bytes: bytes) -> bytes:
    from device_runtime.session import open_session, run

    name = next(n for n in task.assets if n.split("-")[0] == "head")  # head-<cut>
    sha = str(task.assets[name])
    if agent._head is None or agent._head[0] != sha:  # loaded once per head
        agent._head = (sha, open_session(agent.asset(task, name)["onnx"].tobytes(),
                                         agent.opts.threads))
    acts = run(agent._head[1], np.ascontiguousarray(agent.x, np.float32), 256)
    codec = codecs.get(task.codec)
    tensors, params = codec.encode({"acts": acts, "labels": agent.y.astype(np.int64)},
                                   CodecContext(task.round, task.seed, None, agent.device))
    return wire.encode(wire.Frame("update", agent.opts.job, task.round, agent.device,
                                  task.codec, tensors, params,
                                  {"samples": int(len(agent.y)), "variant": task.variant},
                                  nonce=task.nonce), signer=agent.key)


ACTS = Uplink(activations, asset="head", passes=1)  # the head runs forward only
