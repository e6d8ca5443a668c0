"""Centralized training and evaluation (pre-training, fine-tuning after pruning)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from device_runtime.training.local import predict_logits, run_epoch


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
        total, seen = run_epoch(model, xt, yt, opt, opts.batch_size, gen, sched)
        if on_epoch is not None:
            on_epoch(epoch, total / max(seen, 1))
    model.eval()
    return model


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict_logits(model, x).argmax(1) == y).mean())
