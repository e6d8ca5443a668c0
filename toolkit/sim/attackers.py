"""Attacking devices for ``fedge simulate --attack kind:count[:scale]``.

The fleet's first ``count`` agents (dev-0 ...) train as usual and then send what
``toolkit.sim.attacks`` makes of their training instead of it: the update is coded
by the task's codec and signed like any other, so the aggregator's guard, the
codec's decode and the fold see it exactly as they would see a device in the field.
BatchNorm running statistics stay honest (they are averaged, not trained, and a
negative variance would only break the evaluation).

- ``replace``: trains on flipped labels and boosts its change by devices / count
  (``scale`` if given): together the attackers replace the FedAvg model.
- ``signflip``: its honest change reversed, x ``scale`` (default 1).
- ``noise``: the reference plus N(0, ``scale``^2) per weight (default 1).
- ``lie``: the attackers pool their honest updates of the round (``Collusion``) and
  all send the same mean + z x std ("a little is enough", z from devices and count).
- ``labelflip``: trains honestly on flipped labels (label c -> classes - 1 - c).
- ``absent``: no agent at all (``toolkit.sim.simulate``): the other devices keep the
  shards of the same partition, and the aggregator waits for them only (the oracle).
"""
from __future__ import annotations

import threading
import zlib

import numpy as np

from device_runtime.agent import DeviceAgent
from device_runtime.codecs.base import is_statistic
from device_runtime.uplinks import Uplink
from toolkit.sim.attacks import (Attack, label_flip, large_norm_noise, lie_z,
                                 little_is_enough, model_replacement, sign_flip)

Weights = dict[str, np.ndarray]
NOISE_STD = 1.0  # per weight: ~20x an honest change's RMS on MNIST-1D's CNN


class Collusion:
    """The attackers' shared board: each posts its honest update of a round and reads
    all of them (it waits up to ``timeout`` s for the others, then takes what came)."""

    def __init__(self, count: int, timeout: float = 60.0):
        self.count, self.timeout = count, timeout
        self.cond = threading.Condition()
        self.seen: dict[int, dict[str, Weights]] = {}

    def share(self, round_: int, device: str, update: Weights) -> list[Weights]:
        with self.cond:
            self.seen.setdefault(round_, {})[device] = update
            self.cond.notify_all()
            self.cond.wait_for(lambda: len(self.seen[round_]) >= self.count, self.timeout)
            self.seen = {r: v for r, v in self.seen.items() if r >= round_ - 1}
            return [self.seen[round_][d] for d in sorted(self.seen[round_])]


class AttackerAgent(DeviceAgent):
    """A ``DeviceAgent`` whose weights uplink sends the attack's update."""

    def __init__(self, transport, opts, x: np.ndarray, y: np.ndarray, attack: Attack,
                 devices: int, classes: int, collusion: Collusion, seed: int = 0):
        if attack.kind in ("labelflip", "replace"):
            x, y = label_flip(x, y, classes)
        super().__init__(transport, opts, x, y)
        self.attack, self.fleet, self.collusion = attack, devices, collusion
        self.rng = np.random.default_rng([seed, zlib.crc32(opts.device.encode())])

    def uplink(self, kind: str) -> Uplink:
        base = super().uplink(kind)
        if kind != "weights" or self.attack.kind == "labelflip":
            return base
        from device_runtime.training.work import train_uplink

        return Uplink(train_uplink(self._poisoned), base.asset, base.passes)

    def _poisoned(self, agent, task, model, res, frame) -> tuple[Weights, Weights]:
        ref = frame.tensors
        trained = {k: v for k, v in res.weights.items() if not is_statistic(k)}
        base = {k: ref[k] for k in trained}
        a = self.attack
        if a.kind == "replace":
            bad = model_replacement(base, trained, a.scale or self.fleet / a.count)
        elif a.kind == "signflip":
            bad = sign_flip(base, trained, a.scale or 1.0)
        elif a.kind == "noise":
            bad = large_norm_noise(base, a.scale or NOISE_STD, self.rng)
        else:  # lie: every attacker sends the one same update (statistics: their mean)
            seen = self.collusion.share(task.round, self.device, res.weights)
            if len(seen) < 2:
                return res.weights, ref
            stats = {k: np.mean([u[k] for u in seen], axis=0).astype(np.float32)
                     for k in res.weights if k not in trained}
            bad = little_is_enough([{k: u[k] for k in trained} for u in seen],
                                   lie_z(self.fleet, a.count))
            return {**stats, **bad}, ref
        return {**res.weights, **bad}, ref
