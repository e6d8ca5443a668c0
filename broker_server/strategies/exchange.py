"""What a strategy and the service pass each other: a device as seen, its assignment
for a round, and an update received. Apart from ``base.py`` so that the folds
(``folds.py``), which ``Strategy.fold`` returns, need not import the interface."""
from __future__ import annotations

from dataclasses import dataclass, field

from device_runtime.codecs.base import Weights


@dataclass(frozen=True)
class DeviceInfo:
    id: str
    profile: str
    samples: int


@dataclass(frozen=True)
class Assignment:
    """One device's work this round (the service turns it into a Task message)."""

    variant: str = "full"
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    steps: int = 0  # > 0: exactly this many local minibatch steps instead of epochs
    model: dict = field(default_factory=dict)  # the variant's ModelConfig JSON, if not the plan's
    # What the device sends back, the kind of work it does (device_runtime.uplinks):
    # "weights", "logits", "acts", "split"
    uplink: str = "weights"
    assets: tuple[str, ...] = ()  # the job's assets (``Strategy.assets``) it needs


@dataclass(frozen=True)
class Update:
    device: str
    round: int
    weights: Weights
    samples: int
    meta: dict = field(default_factory=dict)
    raw: tuple | None = None  # the update as coded on the wire (sign voting, EcoFed buffers)


__all__ = ["DeviceInfo", "Assignment", "Update"]
