"""The codec interface: how a weights update becomes wire tensors and back.

A codec turns ``{name: float32 array}`` into the tensors of a frame (with
per-tensor JSON params) and back, and states the exact wire dtypes and shapes
it will produce, so the receiver's decoder checks them before reading.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import numpy as np

from device_runtime.wire import TensorSpec

Weights = dict[str, np.ndarray]
STATISTICS = ("running_mean", "running_var")


def is_statistic(name: str) -> bool:
    """BatchNorm running statistics: measured, not trained, so not coded as updates."""
    return name.rsplit(".", 1)[-1] in STATISTICS


@dataclass(frozen=True)
class CodecContext:
    """What both ends share for one round (seed, the global model it is relative to)."""

    round: int = 0
    seed: int = 0
    reference: Weights | None = field(default=None, compare=False)
    device: str = ""  # the sender: its own randomness (e.g. rounding) must differ per device


class Codec(ABC):
    name: str = ""

    @abstractmethod
    def encode(self, weights: Weights, ctx: CodecContext) -> tuple[Weights, dict[str, dict]]:
        """Wire tensors and their per-tensor params."""

    def encode_change(self, weights: Weights, ctx: CodecContext
                      ) -> tuple[Weights, dict[str, dict]]:
        """``encode`` for the coded downlink, whose change is an aggregate rather than
        one device's update; a codec that can code an aggregate better overrides it."""
        return self.encode(weights, ctx)

    def decode_change(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext
                      ) -> Weights:
        """``decode`` of what ``encode_change`` sent."""
        return self.decode(tensors, params, ctx)

    def change_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        """``wire_spec`` of what ``encode_change`` sends."""
        return self.wire_spec(shapes)

    @abstractmethod
    def decode(self, tensors: Weights, params: dict[str, dict], ctx: CodecContext) -> Weights:
        """Back to float32 weights (raises WireError on an inconsistent payload)."""

    @abstractmethod
    def wire_spec(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorSpec]:
        """The wire tensors a valid payload has, for weights of these shapes."""
