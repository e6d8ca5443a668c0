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
