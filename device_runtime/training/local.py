"""Local training on a device: SGD on its own shard, weights in and out as numpy.

Weights travel as ``{name: float32 array}`` for every floating tensor of the
state dict (parameters and BatchNorm statistics; integer counters stay local).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import nn

from device_runtime.errors import ModelBuildError


@dataclass(frozen=True)
class LocalTrainOptions:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    steps: int = 0  # > 0: exactly this many minibatch steps (signSGD) instead of epochs


@dataclass(frozen=True)
class LocalResult:
    weights: dict[str, np.ndarray]
    samples: int
    loss: float
    seconds: float


def weights_of(model: nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().astype(np.float32, copy=True)
            for k, v in model.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The model's float32 logits on ``x`` in eval mode, in batches."""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size], np.float32)))
           .numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(out).astype(np.float32, copy=False) if out else \
        np.zeros((0, 0), np.float32)


def load_weights(model: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy ``weights`` into ``model``; names and shapes must match exactly."""
    state = model.state_dict()
    expected = {k for k, v in state.items() if v.is_floating_point()}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        # Names come from the server's torch, the model from this device's (versions may
        # differ, issue 23): a renamed state-dict entry must stop the round, loudly.
        raise ModelBuildError(f"weights do not fit the model built by torch "
                              f"{torch.__version__}: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
    for k, w in weights.items():
        if tuple(state[k].shape) != tuple(w.shape):
            raise ModelBuildError(f"weights.{k}: expected shape {tuple(state[k].shape)}, "
                                  f"got {tuple(w.shape)}")
        state[k].copy_(torch.from_numpy(np.array(w, dtype=np.float32)))  # keeps 0-d shapes


def minibatches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """One shuffled pass over ``n`` samples, as index tensors; a last batch of one
    sample is dropped (BatchNorm cannot train on it)."""
    perm = torch.randperm(n, generator=gen)
    for i in range(0, n, batch_size):
        idx = perm[i:i + batch_size]
        if len(idx) >= 2:
            yield idx


def run_epoch(model: nn.Module, xt: torch.Tensor, yt: torch.Tensor,
              opt: torch.optim.Optimizer, batch_size: int, gen: torch.Generator,
              sched=None) -> tuple[float, int]:
    """One shuffled pass of minibatch SGD; (sum of losses, samples seen)."""
    model.train()
    total, seen = 0.0, 0
    for idx in minibatches(len(xt), batch_size, gen):
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total, seen


def run_steps(model: nn.Module, xt: torch.Tensor, yt: torch.Tensor,
              opt: torch.optim.Optimizer, batch_size: int, steps: int,
              gen: torch.Generator) -> tuple[float, int]:
    """Exactly ``steps`` minibatches of ``batch_size`` drawn at random (a device's
    minibatch size is its own: signSGD-FV weighs devices by how reliable that makes them)."""
    model.train()
    total, seen = 0.0, 0
    b = max(2, min(batch_size, len(xt)))
    for _ in range(steps):
        idx = torch.randperm(len(xt), generator=gen)[:b]
        loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total, seen


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray,
                opts: LocalTrainOptions) -> LocalResult:
    """Plain local SGD (FedAvg's client update); returns the new weights."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(opts.seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=opts.lr, momentum=opts.momentum,
                          weight_decay=opts.weight_decay)
    total, seen = 0.0, 0
    if opts.steps > 0:
        total, seen = run_steps(model, xt, yt, opt, opts.batch_size, opts.steps, gen)
    for _ in range(opts.epochs if opts.steps <= 0 else 0):
        loss_sum, n = run_epoch(model, xt, yt, opt, opts.batch_size, gen)
        total, seen = total + loss_sum, seen + n
    model.eval()
    return LocalResult(weights_of(model), len(x), total / max(seen, 1),
                       time.perf_counter() - t0)
