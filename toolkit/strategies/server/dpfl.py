"""dpfl: vanilla split learning, SplitFed-style (the baseline EcoFed is measured against).

Each device trains the head (the stages before its cut) with torch; for every
minibatch it sends the fp32 activations and labels up and gets the loss gradient
with respect to them back, while the server trains the tail on them one batch at a
time (one server-side model, SplitFed v2), in arrival order or in lockstep
(``DPFLOptions.lockstep``, ``broker_server/batches.py``). At the round's end the devices send
their heads and every tensor is averaged over whoever trained it, weighted by
samples: a device for the stages of its head, the server for the stages it
trained on behalf of devices with an earlier cut. Cuts may differ per profile
(the planner's choice: compute, activation bytes each way, head bytes, round trips).

Needs torch, so it lives in the toolkit; its spec (options, flags, setup) is
``toolkit/strategies/dpfl.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from broker_server.batches import BatchReplies
from broker_server.strategies import Assignment, DeviceInfo, Strategy, Update
from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.base import Weights
from broker_server.strategies.folds import DecodeAll
from device_runtime.errors import WireError
from device_runtime.training.local import load_weights, weights_of
from device_runtime.local_models import NO_CUSTOM, LocalModels
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.training.split import head_names, parse_head_variant, stage_of
from toolkit.planning.profiles import DeviceProfile
from toolkit.strategies.options import DPFLOptions
from toolkit.strategies.server.flops import counted, shape_key

HEAD_CODECS = ("fp32", "fp16")  # the round's upload is the head itself
SAMPLES_HINT = 500  # samples per device assumed when planning cuts before devices join


@dataclass(frozen=True)
class DPFLSetup:
    config: ModelConfig
    cuts: dict[str, int]  # profile -> split point
    act_shapes: dict[int, tuple[int, ...]]  # split point -> one sample's activation shape
    options: DPFLOptions = field(default_factory=DPFLOptions)
    allowed: LocalModels = NO_CUSTOM  # the operator's custom factories (the config's)

    def cut_of(self, profile: str) -> int:
        # A profile the setup did not plan for gets the earliest (cheapest head) cut.
        return self.cuts.get(profile, min(self.cuts.values()))


def round_seconds(cand, profile: DeviceProfile, batch_size: int = 32,
                  samples: int = SAMPLES_HINT) -> float:
    """A device's estimated dpfl round at cut ``cand`` (a plan.SplitCandidate with the
    head's parameter count in ``head_params``): head forward and backward, fp32
    activations up and gradients down, the head both ways, one round trip per batch."""
    compute = 3 * 2 * cand.head_macs / (profile.gflops * 1e9)
    link = cand.act_bytes_fp32 * 8 * (1 / (profile.uplink_kbps * 1e3) +
                                      1 / (profile.downlink_kbps * 1e3))
    head = 4 * cand.head_params * 8 * (1 / (profile.uplink_kbps * 1e3) +
                                       1 / (profile.downlink_kbps * 1e3))
    batches = -(-samples // batch_size)
    return samples * (compute + link) + head + batches * profile.rtt_ms / 1e3


class DPFL(Strategy):
    name = "dpfl"

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: DPFLSetup | None = None):
        if not isinstance(options, DPFLSetup):
            raise ValueError("dpfl: options must be a DPFLSetup (config, cuts per profile)")
        self.setup, self.opts = options, options.options
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.model = build_model(options.config, options.allowed)
        self.cut: dict[str, int] = {}  # device -> its cut, set when assigned
        self.sgd: torch.optim.Optimizer | None = None
        self.trained: dict[int, int] = {}  # cut -> samples the server trained from it

    def variants(self, global_weights: Weights) -> dict[str, Weights]:
        return {}  # published per cut when a device is assigned one

    def variant(self, global_weights: Weights, name: str) -> Weights:
        after = parse_head_variant(name)
        return {k: global_weights[k] for k in head_names(global_weights, after)}

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        out = {}
        for d in devices:
            self.cut[d.id] = self.setup.cut_of(d.profile)
            out[d.id] = Assignment(f"head-{self.cut[d.id]}", self.epochs, self.batch_size,
                                   self.lr, uplink="split")
        return out

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        if codec.name not in HEAD_CODECS:
            raise ValueError(f"dpfl: expected codec {' or '.join(HEAD_CODECS)} (the head is "
                             f"sent whole), got {codec.name}")
        load_weights(self.model, global_weights)  # the round's server side starts global
        self.sgd = torch.optim.SGD(self.model.parameters(), lr=self.lr,
                                   momentum=self.opts.momentum,
                                   weight_decay=self.opts.weight_decay)
        self.trained = {}
        return DecodeAll(self, round_, global_weights, codec, ctx)

    def side_channel(self, job: str) -> BatchReplies:
        return BatchReplies(job, self.on_batch, self.check, lockstep=bool(self.opts.lockstep))

    def check(self, device: str, tensors: Weights, batch_size: int) -> None:
        """WireError unless ``tensors`` are a batch for ``device``'s cut."""
        check_batch(tensors, self.setup.act_shapes[self.cut[device]], batch_size,
                    self.setup.config.num_classes)

    def on_batch(self, round_: int, device: str, tensors: Weights,
                 batch_size: int) -> tuple[np.ndarray, float]:
        """Train the tail on one minibatch of a device's activations (at most
        ``batch_size``); returns the loss gradient w.r.t. the activations, and the loss."""
        after = self.cut[device]
        acts, labels = check_batch(tensors, self.setup.act_shapes[after], batch_size,
                                   self.setup.config.num_classes)  # again: cheap, and safe
        a = torch.from_numpy(acts).requires_grad_(True)
        tail = nn.Sequential(*self.model.stages[after:])
        tail.train()

        def step() -> torch.Tensor:
            loss = nn.functional.cross_entropy(tail(a), torch.from_numpy(labels))
            self.sgd.zero_grad()
            loss.backward()
            self.sgd.step()  # head parameters have no gradient here, so SGD leaves them be
            return loss

        loss = counted(shape_key("train", tail, acts.shape), step)
        self.trained[after] = self.trained.get(after, 0) + len(labels)
        return a.grad.numpy().astype(np.float32), float(loss.detach())

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        server = weights_of(self.model)
        out = dict(global_weights)
        for name in global_weights:
            stage = stage_of(name)
            parts = [({name: u.weights[name]}, u.samples) for u in updates if name in u.weights]
            by_server = sum(n for cut, n in self.trained.items() if cut <= stage)
            if by_server:
                parts.append(({name: server[name]}, by_server))
            if parts:
                out[name] = weighted_average(parts)[name]
        return out


def check_batch(tensors: Weights, act_shape: tuple[int, ...], batch_size: int,
                classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch of activations and labels, or WireError naming what is wrong."""
    if set(tensors) != {"acts", "labels"}:
        raise WireError(f"tensors: expected acts and labels, got {sorted(tensors)}")
    acts, labels = tensors["acts"], tensors["labels"]
    if acts.dtype != np.float32 or acts.ndim != 1 + len(act_shape) or \
            tuple(acts.shape[1:]) != tuple(act_shape) or not 1 <= len(acts) <= batch_size:
        raise WireError(f"acts: expected float32 (1..{batch_size}, "
                        f"{', '.join(map(str, act_shape))}) for this split point, got "
                        f"{acts.dtype} {tuple(acts.shape)}")
    if labels.dtype != np.int64 or labels.shape != (len(acts),):
        raise WireError(f"labels: expected int64 ({len(acts)},), got {labels.dtype} "
                        f"{tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() >= classes:
        raise WireError(f"labels: expected classes 0..{classes - 1}, got "
                        f"{int(labels.min())}..{int(labels.max())}")
    if not np.isfinite(acts).all():
        raise WireError("acts: expected finite values, got NaN or inf")
    return acts, labels

