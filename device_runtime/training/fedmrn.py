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
    params = dict(model.named_parameters())
    names = [k for k, p in params.items() if masked(tuple(p.shape))]
    base = {k: params[k].detach().clone() for k in names}
    noises = {k: torch.tensor(noise(k, tuple(base[k].shape), seed, scale)) for k in names}
    # The latent is kept as the ratio r = u / n: the mask's clip is then of r itself and
    # SGD on u (u -= lr g) is r -= lr g / n, the same steps with one division fewer.
    ratio = {k: torch.zeros_like(base[k]) for k in names}
    opt = torch.optim.SGD([p for k, p in params.items() if k not in names], lr=opts.lr,
                          momentum=opts.momentum)
    # keep u/n in a band around the mask's range so a mask can always flip back
    band = (-1.5, 1.5) if signed else (-0.5, 1.5)
    mask_rng = np.random.Generator(np.random.SFC64(device_seed(opts.seed, device)))
    maskers = {k: Masker(base[k], noises[k], signed, mask_rng) for k in names}
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(y)
    steps = max(1, opts.epochs * (len(xt) // opts.batch_size))
    step, total, seen = 0, 0.0, 0
    model.train()
    for _ in range(opts.epochs):
        for idx in minibatches(len(xt), opts.batch_size, gen):
            p_sample = min(1.0, step / steps)  # progressive stochastic masking
            with torch.no_grad():  # the masked weights go into the model's own tensors
                for k in names:
                    maskers[k].weight(ratio[k], p_sample, out=params[k])
            loss, mean = supervised_loss(model, xt[idx], yt[idx])  # SplitMix: per base
            opt.zero_grad()
            for k in names:
                params[k].grad = None
            loss.backward()
            opt.step()
            with torch.no_grad():  # straight through: d loss / d u is d loss / d weight
                for k in names:  # a weight the loss did not use has no gradient: no step
                    if params[k].grad is not None:
                        ratio[k].addcdiv_(params[k].grad, noises[k], value=-mask_lr)
                        ratio[k].clamp_(*band)
            step += 1
            total += mean * len(idx)
            seen += len(idx)
    with torch.no_grad():  # the final mask is a sample (p = 1), as the paper does
        for k in names:
            maskers[k].weight(ratio[k], 1.0, out=params[k])
    model.eval()
    return LocalResult(weights_of(model), len(x), total / max(seen, 1),
                       time.perf_counter() - t0)


def device_seed(seed: int, device: str) -> int:
    """A 63-bit seed for ``device``'s own draws in the round seeded ``seed``."""
    digest = hashlib.blake2b(f"fedmrn-mask/{seed}/{device}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class Masker:
    """base + n x mask for one tensor, the mask being the continuous clip(u/n, 0, 1)
    (signed: clip(u/n, -1, 1)) with each entry replaced, with probability p, by a
    Bernoulli sample of it (progressive stochastic masking); the gradient passes
    straight through to ``u`` (d weight / d u = 1), through the clip as well: with
    clamp's own zero gradient outside the range, a latent pushed out of it would
    never come back.

    Why it is written this way (cnn-wide, 1.4M masked weights, batch 32: training
    cost 4x plain training when the mask was autograd ops through torch.where and
    torch.bernoulli into a ``functional_call``; docs/results/local_train.md): the
    weight is built without autograd, straight into the model's own parameter, so
    the forward and backward are plain training's and the parameter's gradient is
    the latent's (d weight / d u = 1); buffers are kept across steps (a fresh 5 MB
    tensor per op page-faults); no torch.where or bool tensors (on the CPU they cost
    20x an add): a comparison written into a float tensor is as cheap as an add, and
    ``lerp`` picks between the sample and the clipped ratio in one pass. Each pass
    over 1.4M weights is 0.1-0.3 ms, so the passes are counted: 7 for a step (8
    signed). One uniform draw v per entry serves both choices: u = v / p (scaled as it
    is drawn) is below 1 with probability p (the entry is sampled), and then it is
    uniform on [0, 1), so [u < prob] is its Bernoulli(prob) draw (signed: [2u - 1 <
    prob] is the +1 of a draw with P(+1) = (prob + 1) / 2). The draws are 16-bit,
    from numpy's SFC64 (``uniform16``)."""

    def __init__(self, base: torch.Tensor, n: torch.Tensor, signed: bool,
                 rng: np.random.Generator):
        self.base, self.n, self.signed, self.rng = base, n, signed, rng
        self.prob, self.hit = torch.empty_like(n), torch.empty_like(n)
        self.vt = torch.empty_like(n)  # torch's allocation: 64-byte aligned, ops 1.5x faster
        self.v = self.vt.numpy()

    def weight(self, r: torch.Tensor, p: float, out: torch.Tensor) -> None:
        """``out`` <- base + n x mask(r), r = u / n, each entry sampled with probability p."""
        prob, hit, u = self.prob, self.hit, self.vt
        torch.clamp(r, -1.0 if self.signed else 0.0, 1.0, out=prob)
        if p > 0:
            uniform16(self.rng, self.v, 1.0 / p)  # u = v / p
            if self.signed:  # hit <- 2 [2u - 1 < prob] - 1, a +-1 sample
                torch.mul(u, 2.0, out=hit).sub_(1.0)
                torch.lt(hit, prob, out=hit)
                hit.mul_(2.0).sub_(1.0)
            else:  # hit <- [u < prob], a 0/1 sample
                torch.lt(u, prob, out=hit)
            torch.lt(u, 1.0, out=u)  # sampled: [v < p]
            torch.lerp(prob, hit, u, out=prob)  # the sample where sampled, else prob
        torch.addcmul(self.base, prob, self.n, out=out)


def uniform16(rng: np.random.Generator, out: np.ndarray, scale: float = 1.0) -> None:
    """``out`` (float32) filled with ``scale`` x uniforms on [0, 1) of 16-bit resolution,
    k / 65536, four to each raw 64-bit draw of ``rng``'s bit generator: 0.8 ms per 1.3M
    against 2.4 ms for ``rng.random``'s float32 (and 1.3 ms through ``rng.bytes``). A
    Bernoulli probability off by at most 2^-16 is far below what the sampling itself
    moves; even at the first steps' p = 1/steps the sampled entries' v / p keep 2^16 p
    levels."""
    raw = rng.bit_generator.random_raw(-(-out.size // 4))
    k = raw.view(np.uint16)[:out.size].reshape(out.shape)
    np.multiply(k, np.float32(scale / 65536), out=out)


def train_for_codec(codec, model: nn.Module, x: np.ndarray, y: np.ndarray,
                    opts: LocalTrainOptions, seed: int, device: str) -> LocalResult:
    """``train_fedmrn`` with ``codec``'s mask learning rate, noise scale and signedness
    (the codec's ``trainer``: how ``training.work`` calls it)."""
    return train_fedmrn(model, x, y, opts, seed, device=device, mask_lr=codec.mask_lr,
                        scale=codec.scale, signed=codec.signed)
