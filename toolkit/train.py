"""Centralized training and evaluation (pre-training, fine-tuning after pruning)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 30
    batch_size: int = 64
    lr: float = 1e-2  # peak of the one-cycle schedule
    weight_decay: float = 1e-4
    seed: int = 0


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, opts: TrainOptions,
          on_epoch=None) -> nn.Module:
    """AdamW with a one-cycle schedule; ``on_epoch(epoch, loss)`` reports progress."""
    if opts.epochs <= 0 or len(x) == 0:
        return model
    gen = torch.Generator().manual_seed(opts.seed)
    torch.manual_seed(opts.seed)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y))
    steps_per_epoch = (len(xt) + opts.batch_size - 1) // opts.batch_size
    opt = torch.optim.AdamW(model.parameters(), lr=opts.lr / 10, weight_decay=opts.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opts.lr,
                                                total_steps=opts.epochs * steps_per_epoch)
    for epoch in range(opts.epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), opts.batch_size):
            idx = perm[i:i + opts.batch_size]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if on_epoch is not None:
            on_epoch(epoch, total / len(xt))
    model.eval()
    return model


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_logits(model, x).argmax(1) == y).mean())
