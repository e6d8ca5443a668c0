"""FedMRN local training: learn a binary mask over seeded noise for every conv and
linear weight, with progressive stochastic masking and the straight-through
estimator (docs/ALGORITHMS.md, section 4). BatchNorm and biases train as usual.
"""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from device_runtime.codecs.fedmrn import MASK_LR, NOISE_SCALE, masked, noise
from device_runtime.training.splitmix import supervised_loss
from device_runtime.training.local import (
    LocalResult,
    LocalTrainOptions,
    minibatches,
    weights_of,
)


def train_fedmrn(model: nn.Module, x: np.ndarray, y: np.ndarray, opts: LocalTrainOptions,
                 seed: int, *, device: str, mask_lr: float = MASK_LR,
                 scale: float = NOISE_SCALE, signed: bool = False) -> LocalResult:
    """``model`` holds the round's global weights; returns reference + noise * final mask.
    ``seed`` draws the round's noise, the same on every device (the fold and the coded
    downlink rely on it); the mask's own draws (progressive masking, the final
    Bernoulli sample) come from ``opts.seed`` mixed with ``device``, so two devices
    never draw the same uniforms."""
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(device_seed(opts.seed, device))
    names = [k for k, p in model.named_parameters() if masked(tuple(p.shape))]
    base = {k: p.detach().clone() for k, p in model.named_parameters() if k in names}
    noises = {k: torch.from_numpy(noise(k, tuple(base[k].shape), seed, scale)) for k in names}
    latent = {k: torch.zeros_like(base[k], requires_grad=True) for k in names}
    others = [p for k, p in model.named_parameters() if k not in names]
    opt = torch.optim.SGD([{"params": list(latent.values()), "lr": mask_lr},
                           {"params": others, "lr": opts.lr, "momentum": opts.momentum}])
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    steps = max(1, opts.epochs * (len(xt) // opts.batch_size))
    step, total, seen = 0, 0.0, 0
    model.train()
    for _ in range(opts.epochs):
        for idx in minibatches(len(xt), opts.batch_size, gen):
            p_sample = min(1.0, step / steps)  # progressive stochastic masking
            weights = {k: base[k] + noises[k] * _mask(latent[k], noises[k], p_sample, gen,
                                                      signed) for k in names}
            loss, mean = supervised_loss(  # SplitMix bases: each its own loss
                model, xt[idx], yt[idx],
                lambda *a, **kw: functional_call(model, weights, a, kw))
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():  # keep u/n near [0, 1] so a mask can always flip back
                for k in names:
                    a, b = (-1.5, 1.5) if signed else (-0.5, 1.5)
                    lo, hi = torch.minimum(a * noises[k], b * noises[k]), \
                        torch.maximum(a * noises[k], b * noises[k])
                    latent[k].copy_(torch.maximum(torch.minimum(latent[k], hi), lo))
            step += 1
            total += mean * len(idx)
            seen += len(idx)
    with torch.no_grad():  # the final mask is a sample, as the paper does
        for k in names:
            ratio = latent[k] / noises[k]
            prob = ((ratio + 1) / 2 if signed else ratio).clamp(0, 1)
            m = torch.bernoulli(prob, generator=gen)
            m = 2 * m - 1 if signed else m
            dict(model.named_parameters())[k].copy_(base[k] + noises[k] * m)
    model.eval()
    return LocalResult(weights_of(model), len(x), total / max(seen, 1),
                       time.perf_counter() - t0)


def device_seed(seed: int, device: str) -> int:
    """A 63-bit seed for ``device``'s own draws in the round seeded ``seed``."""
    digest = hashlib.blake2b(f"fedmrn-mask/{seed}/{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _mask(u: torch.Tensor, n: torch.Tensor, p_sample: float, gen: torch.Generator,
          signed: bool = False) -> torch.Tensor:
    """Continuous clip(u/n, 0, 1) (signed: clip(u/n, -1, 1)), replaced with probability p
    by a Bernoulli sample whose gradient passes straight through to the continuous value."""
    ratio = u / n
    lo = -1.0 if signed else 0.0
    # Straight through the clip as well: with clamp's own zero gradient outside the
    # range, a latent pushed out of it would never come back.
    prob = ratio + (ratio.clamp(lo, 1) - ratio).detach()
    p1 = (prob.detach() + 1) / 2 if signed else prob.detach()
    sampled = torch.bernoulli(p1, generator=gen)
    sampled = 2 * sampled - 1 if signed else sampled
    ste = prob + (sampled - prob).detach()
    if p_sample >= 1.0:
        return ste
    pick = torch.rand(prob.shape, generator=gen) < p_sample
    return torch.where(pick, ste, prob)


def train_for_codec(codec, model: nn.Module, x: np.ndarray, y: np.ndarray,
                    opts: LocalTrainOptions, seed: int, device: str) -> LocalResult:
    """``train_fedmrn`` with ``codec``'s mask learning rate, noise scale and signedness
    (the codec's ``trainer``: how ``training.work`` calls it)."""
    return train_fedmrn(model, x, y, opts, seed, device=device, mask_lr=codec.mask_lr,
                        scale=codec.scale, signed=codec.signed)
