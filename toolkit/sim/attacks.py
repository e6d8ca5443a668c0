"""Attacks on federated aggregation, shared by ``bench`` and the tests (pure numpy).

Updates are ``dict[str, np.ndarray]`` models, as devices send them; each attack
returns what a malicious device would send instead, given the round's ``reference``
(the global model it started from). ``poison`` replaces the first ``attackers``
updates of a round with one attack's output, for a chosen number of attacking devices.
Label flipping acts on a device's data instead (``label_flip`` over (x, y) arrays):
the device then trains honestly on wrong labels.

The rule meant for each (``broker_server.robust``, tested in tests/test_attacks.py):
``replace`` (boosted) -> median or norm clipping; ``signflip`` -> trimmed mean;
``noise`` (large norm) -> Krum; ``lie`` is built to pass every one of them, and what
they give is a bound: its shift stays within z honest standard deviations.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from toolkit.errors import UsageError

Weights = dict[str, np.ndarray]
ATTACKS = ("replace", "signflip", "noise", "lie")
# What ``fedge simulate --attack`` takes; ``absent``: the first count devices never join
# (FedAvg over the others: the ceiling of any rule that removes the attackers).
KINDS = ATTACKS + ("labelflip", "absent")


def _change(update: Weights, reference: Weights) -> Weights:
    return {k: update[k].astype(np.float64) - reference[k] for k in reference}


def _model(reference: Weights, change: Weights) -> Weights:
    return {k: (reference[k] + change[k]).astype(np.float32) for k in reference}


def model_replacement(reference: Weights, target: Weights, boost: float) -> Weights:
    """reference + boost x (target - reference): Bagdasaryan et al., "How to backdoor
    federated learning", AISTATS 2020. With boost = n / eta (devices over the server's
    learning rate, ``replacement_boost``) the FedAvg of the round is the attacker's
    ``target`` when the honest changes nearly cancel."""
    return _model(reference, {k: boost * v for k, v in _change(target, reference).items()})


def replacement_boost(devices: int, server_lr: float = 1.0) -> float:
    """The boost that makes one device's update replace the FedAvg model: n / eta."""
    return devices / server_lr


def sign_flip(reference: Weights, update: Weights, scale: float = 1.0) -> Weights:
    """reference - scale x (update - reference): the device sends its honest change
    reversed (sign-flipping attack, Li et al., "RSA: Byzantine-robust stochastic
    aggregation methods for distributed learning from heterogeneous datasets",
    AAAI 2019)."""
    return _model(reference, {k: -scale * v for k, v in _change(update, reference).items()})


def large_norm_noise(reference: Weights, std: float, rng: np.random.Generator) -> Weights:
    """reference + N(0, std^2) per weight: the Gaussian attack of Blanchard et al.,
    "Machine learning with adversaries: Byzantine tolerant gradient descent",
    NeurIPS 2017 (one such device breaks any linear rule such as FedAvg)."""
    return _model(reference, {k: rng.normal(0.0, std, size=v.shape)
                              for k, v in reference.items()})


def label_flip(x: np.ndarray, y: np.ndarray, classes: int,
               mapping: dict[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x, flipped y): every label c becomes classes - 1 - c, or, with ``mapping``, only
    the source labels it names become their targets (Tolpegin et al., "Data poisoning
    attacks against federated learning systems", ESORICS 2020). x is not copied."""
    y = np.asarray(y)
    if mapping is None:
        return x, (classes - 1 - y).astype(y.dtype)
    out = y.copy()
    for src, dst in mapping.items():
        out[y == src] = dst
    return x, out


def lie_z(devices: int, attackers: int) -> float:
    """z_max of "A little is enough" (Baruch, Baruch, Goldberg, NeurIPS 2019):
    s = floor(n / 2 + 1) - f devices must be won over, and z = Phi^-1((n - s) / n),
    the largest shift for which enough honest devices still lie farther from the mean
    than the attackers do."""
    s = math.floor(devices / 2 + 1) - attackers
    return NormalDist().inv_cdf((devices - s) / devices)


def little_is_enough(seen: list[Weights], z: float) -> Weights:
    """mean + z x std per coordinate of the updates the attackers ``seen`` (their own
    benign ones, or the honest ones if they can see them): every coordinate stays
    within the honest spread, so median, trimmed mean and Krum let it through (Baruch
    et al. 2019, Algorithm 1)."""
    out = {}
    for k in seen[0]:
        v = np.stack([u[k].astype(np.float64) for u in seen])
        out[k] = (v.mean(axis=0) + z * v.std(axis=0)).astype(np.float32)
    return out


@dataclass(frozen=True)
class Attack:
    """``count`` devices (dev-0 .. dev-{count-1}) attack with ``kind``; ``scale``: the
    sign flip's factor, replace's boost (0: devices / count), the noise's std."""

    kind: str
    count: int
    scale: float = 0.0


def parse_attack(text: str, devices: int) -> Attack:
    """``kind:count[:scale]`` (e.g. ``signflip:4``) for a fleet of ``devices``."""
    kind, *rest = text.strip().split(":")
    if kind not in KINDS:
        raise UsageError(f"--attack: unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    if not 1 <= len(rest) <= 2:
        raise UsageError(f"--attack: expected kind:count[:scale], got {text!r}")
    try:
        count, scale = int(rest[0]), float(rest[1]) if len(rest) > 1 else 0.0
    except ValueError:
        raise UsageError(f"--attack: count and scale must be numbers, got {text!r}") from None
    if not 0 <= count < devices or scale < 0:
        raise UsageError(f"--attack: count must be in [0, {devices - 1}] and scale >= 0, "
                         f"got {count} and {scale}")
    return Attack(kind, count, scale)


def poison(kind: str, updates: list[Weights], reference: Weights, attackers: int,
           rng: np.random.Generator, target: Weights | None = None, boost: float = 0.0,
           std: float = 10.0) -> list[Weights]:
    """The round's updates with the first ``attackers`` replaced by ``kind``'s: replace
    (towards ``target``, by ``boost``, default n), signflip (each attacker's own change
    reversed), noise (``std``), lie (z from n and f, over all the updates as seen)."""
    if kind not in ATTACKS:
        raise UsageError(f"attack: unknown kind {kind!r}; valid: {', '.join(ATTACKS)} "
                         f"(label flipping acts on data: label_flip)")
    if not 0 <= attackers <= len(updates):
        raise UsageError(f"attack: attackers must be in [0, {len(updates)}], got {attackers}")
    n, out = len(updates), list(updates)
    if kind == "lie" and attackers:
        bad = little_is_enough(updates, lie_z(n, attackers))
    for i in range(attackers):
        if kind == "replace":
            if target is None:
                raise UsageError("attack replace: needs a target model")
            out[i] = model_replacement(reference, target, boost or replacement_boost(n))
        elif kind == "signflip":
            out[i] = sign_flip(reference, updates[i])
        elif kind == "noise":
            out[i] = large_norm_noise(reference, std, rng)
        else:
            out[i] = bad
    return out
