"""The JSON control messages of the protocol: plan, status, task, control.

Each is a typed dataclass; ``parse(cls, payload)`` validates a received
payload at the boundary and raises ``MessageError`` naming the field, the
expected and the actual value. Frames (weights, updates) are in ``wire``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TypeVar

from device_runtime.errors import EXIT_DATA, DeviceRuntimeError

MAX_MESSAGE = 256 * 1024


class MessageError(DeviceRuntimeError):
    exit_code = EXIT_DATA


_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


@dataclass(frozen=True)
class Plan:
    """Retained on ``plan``: what the job is."""

    job: str
    strategy: str
    codec: str
    rounds: int
    model: dict  # ModelConfig JSON: devices build the same model
    min_devices: int
    round_timeout: float
    train: dict = field(default_factory=dict)  # local training options
    variants: dict = field(default_factory=dict)  # variant -> {"tensors": {name: shape}}


@dataclass(frozen=True)
class Status:
    """Retained on ``devices/<id>/status``; the broker publishes the will on a crash."""

    device: str
    state: str  # "online" | "offline" | "error"
    profile: str = ""
    samples: int = 0
    versions: dict = field(default_factory=dict)
    error: str = ""
    ts: float = 0.0


@dataclass(frozen=True)
class Task:
    """On ``round/<r>/task/<id>``: what one device does this round."""

    round: int
    device: str
    variant: str
    model_sha256: str  # sha256 of the model frame's bytes, checked before use
    deadline: float  # unix time
    epochs: int
    batch_size: int
    lr: float
    seed: int
    codec: str
    steps: int = 0  # > 0: exactly this many local minibatch steps instead of epochs
    model: dict = field(default_factory=dict)  # the variant's ModelConfig, if not the plan's
    uplink: str = "weights"  # "logits": the trained model's logits on the "public" asset
    assets: dict = field(default_factory=dict)  # asset name -> sha256 of its frame
    # The coded downlink: a device holding the model frame with sha256 base_sha256 may
    # fetch the (small) sync frame instead, apply it, and check the result's sha256.
    base_sha256: str = ""
    sync_sha256: str = ""


@dataclass(frozen=True)
class Control:
    """On ``control``: the job's end (or a pause)."""

    action: str  # "stop" | "pause"
    reason: str = ""


M = TypeVar("M")


def dump(msg) -> bytes:
    return json.dumps(dataclasses.asdict(msg), sort_keys=True).encode()


def parse(cls: type[M], payload: bytes) -> M:
    name = cls.__name__.lower()
    if len(payload) > MAX_MESSAGE:
        raise MessageError(f"{name}: {len(payload)} bytes exceeds {MAX_MESSAGE}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MessageError(f"{name}: not a JSON document: {e}") from None
    if not isinstance(data, dict):
        raise MessageError(f"{name}: expected a JSON object, got {type(data).__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{name}.{f.name}: missing")
            continue
        v = data[f.name]
        if not _CHECKS[f.type](v):
            raise MessageError(f"{name}.{f.name}: expected {f.type}, got "
                               f"{type(v).__name__} {str(v)[:40]!r}")
        values[f.name] = float(v) if f.type == "float" else v
    return cls(**values)
