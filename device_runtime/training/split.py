"""Split learning on the device (dpfl, SplitFed): train the head, the server trains the tail.

For every minibatch the device runs its head (the model's stages before the cut),
hands the activations and labels to ``exchange`` (which sends them to the server
and waits for the gradient of the loss with respect to them) and back-propagates
that gradient through the head. Batches and the optimizer are those of
``train_local``, so one device doing a dpfl round computes what it would
computing the whole model locally (a test checks it).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch
from torch import nn

from device_runtime.errors import ModelBuildError
from device_runtime.training.local import LocalResult, LocalTrainOptions, minibatches, weights_of
from device_runtime.uplinks import Uplink

# (step, activations, labels) -> (gradient of the loss w.r.t. the activations, loss)
Exchange = Callable[[int, np.ndarray, np.ndarray], tuple[np.ndarray, float]]


def stage_of(name: str) -> int:
    """The stage a tensor belongs to (names ``stages.<i>.…``), -1 for any other tensor."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "stages" and parts[1:2] and parts[1].isdigit() else -1


def head_names(names, after: int) -> list[str]:
    """The tensors of stages ``0..after-1``: the device's part."""
    return [k for k in names if 0 <= stage_of(k) < after]


def parse_head_variant(variant: str) -> int:
    """``head-<k>``: the device trains the stages before cut ``k``."""
    prefix, _, k = variant.partition("-")
    if prefix != "head" or not k.isdigit() or int(k) < 1:
        raise ModelBuildError(f"variant: expected 'head-<cut>' with cut >= 1, got {variant!r}")
    return int(k)


def train_head(model: nn.Module, after: int, x: np.ndarray, y: np.ndarray,
               opts: LocalTrainOptions, exchange: Exchange) -> LocalResult:
    """SGD on ``model.stages[:after]`` with gradients from the server; returns the head's
    weights only."""
    stages = getattr(model, "stages", None)
    if not isinstance(stages, nn.ModuleList) or not 1 <= after < len(stages):
        raise ModelBuildError(f"split point: expected 1..{len(stages or []) - 1} for this "
                              f"model, got {after}")
    t0 = time.perf_counter()
    head = nn.Sequential(*stages[:after])
    gen = torch.Generator().manual_seed(opts.seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    yl = np.asarray(y, np.int64)
    opt = torch.optim.SGD(head.parameters(), lr=opts.lr, momentum=opts.momentum,
                          weight_decay=opts.weight_decay)
    head.train()
    total, seen, step = 0.0, 0, 0
    for _ in range(opts.epochs):
        for idx in minibatches(len(xt), opts.batch_size, gen):
            acts = head(xt[idx])
            grad, loss = exchange(step, acts.detach().numpy(), yl[idx.numpy()])
            if grad.shape != tuple(acts.shape):
                raise ModelBuildError(f"grad: expected shape {tuple(acts.shape)}, got "
                                      f"{grad.shape}")
            opt.zero_grad()
            acts.backward(torch.from_numpy(np.ascontiguousarray(grad, np.float32)))
            opt.step()
            total, seen, step = total + loss * len(idx), seen + len(idx), step + 1
    head.eval()
    w = weights_of(model)
    return LocalResult({k: w[k] for k in head_names(w, after)}, len(x), total / max(seen, 1),
                       time.perf_counter() - t0)


def _split_work(agent, task, frame_bytes: bytes) -> bytes:
    """dpfl's device work (uplink "split"): the frame holds the head's tensors only;
    the head trains here, the tail on the server, one batch exchange at a time."""
    from device_runtime import messages
    from device_runtime.split_link import exchanger
    from device_runtime.training.work import send_weights, train_task

    if agent.plan is None:
        raise messages.MessageError("task arrived before the plan")
    after = parse_head_variant(task.variant)
    model = agent._build("full", task.model)
    w = weights_of(model)
    shapes = {k: tuple(w[k].shape) for k in head_names(w, after)}

    def fit(model, agent, task, local):
        return train_head(model, after, agent.x, agent.y, local, exchanger(agent, task))
    return train_task(agent, task, frame_bytes, model, shapes, fit, send_weights, merge=True)


SPLIT = Uplink(_split_work)
