"""A device's work for a task, by the task's uplink kind: what it computes and sends.

One table, kind -> the import path of its ``Uplink``; the agent looks the kind up
and runs it, with no chain of ifs. A kind's module is imported only when a task of
that kind is worked on, so a device that only runs EcoFed's frozen head ("acts")
never imports torch. A strategy with a new kind of device work adds a handler
module and one line here (``register``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from device_runtime.registry import Registry


@dataclass(frozen=True)
class Uplink:
    """``work(agent, task, model_frame)``: the signed update frame to send;
    ``asset``: the asset (name up to its first "-") a task of this kind must name;
    ``passes``: forward passes per sample, for the simulated compute time (training
    is a forward and a backward, ~3); ``trains``: counts as a trained round."""

    work: Callable[..., bytes]
    asset: str = ""
    passes: int = 3
    trains: bool = True


KINDS: Registry[Uplink | str] = Registry("uplink")
KINDS.register("weights", "device_runtime.training.work:WEIGHTS")  # the trained model
KINDS.register("logits", "device_runtime.training.work:LOGITS")  # its answers (FedMD, reft)
KINDS.register("acts", "device_runtime.frozen_head:ACTS")  # a frozen head's output (ecofed)
KINDS.register("split", "device_runtime.training.split:SPLIT")  # split learning (dpfl)
# scores the task's model on the held-out data (fedge serve --eval-every)
KINDS.register("evaluate", "device_runtime.training.evaluate:EVALUATE")


def register(kind: str, uplink: Uplink | str) -> None:
    KINDS.register(kind, uplink)


def kinds() -> list[str]:
    return KINDS.in_order()


def get(kind: str) -> Uplink:
    """The Uplink of ``kind`` (imported on first use); check the name with ``kinds()``."""
    return KINDS.load(kind)
