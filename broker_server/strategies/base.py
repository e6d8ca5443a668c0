"""The strategy interface: what a round asks of each device, and how results merge.

As in Flower, a strategy is a few hooks around one ``run()`` loop (the
aggregator service owns the loop); the maths live in pure numpy functions in
``aggregate.py``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol


from broker_server.strategies.exchange import Assignment, DeviceInfo, Update
from device_runtime.codecs.base import Weights


class SideChannel(Protocol):
    """A strategy's mid-round exchange with a device that has an open task."""

    def answer(self, round_: int, device: str, payload: bytes, task, trust) -> bytes:
        """The signed reply frame (on the device's ``grad`` topic), or WireError."""


class Strategy(ABC):
    name: str = ""
    # Every device trains the one "full" model from its weights: the model can reach
    # devices as a coded change (``--downlink``, broker_server/downlink.py).
    coded_downlink: bool = False

    def variants(self, global_weights: Weights) -> dict[str, Weights]:
        """Model frames to publish this round, by variant (default: one, "full")."""
        return {"full": global_weights}

    def variant(self, global_weights: Weights, name: str) -> Weights:
        """The weights of a variant that ``assign`` named but ``variants`` did not publish."""
        if name == "full":
            return global_weights
        raise ValueError(f"variant: strategy {self.name} has no variant {name!r}")

    def update_shapes(self, variant: str, model_shapes: dict, samples: int) -> dict:
        """The tensors an update for ``variant`` from a device holding ``samples`` must
        hold (default: the variant's model)."""
        return model_shapes

    def assets(self) -> dict[str, Weights]:
        """Frames published once per job, retained, by name (e.g. REFT's public inputs);
        an assignment lists those its device needs in ``assets``."""
        return {}

    def side_channel(self, job: str) -> SideChannel | None:
        """What answers the devices' mid-round messages (their ``acts`` topic), if the
        strategy takes any (dpfl: a batch of activations in, the loss gradient out)."""
        return None

    @abstractmethod
    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        """Which devices work this round, and on what."""

    @abstractmethod
    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        """The new global weights from the accepted updates (at least one)."""

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        """The round's ``Fold`` (see folds.py): how updates are folded in as they arrive.
        The default decodes every update and calls ``aggregate`` on all of them."""
        from broker_server.strategies.folds import DecodeAll

        return DecodeAll(self, round_, global_weights, codec, ctx)

    @classmethod
    def split_options(cls, codec: str, options: object | None) -> dict | None:
        """Scale-out (broker_server/scaleout.py): the JSON fold options the workers need
        when this rule's fold with ``codec`` is a sum of the updates; None: no split."""
        return None

    @classmethod
    def for_worker(cls, options: dict) -> Strategy | None:
        """The rule a scale-out worker folds with, given ``split_options``' result (only
        its fold matters); None: not one a worker can fold."""
        return None

    def report(self) -> dict:
        """Entries for the job report (e.g. the robust rule's name, the DP epsilon)."""
        return {}

    def state(self) -> dict:
        """JSON state saved with every checkpoint (e.g. FV voting weights)."""
        return {}

    def load_state(self, state: dict) -> None:
        pass


class TrainsAlone(ABC):
    """Optional, beside ``Strategy``: a strategy that trains on the server from tensors
    devices sent in earlier rounds (EcoFed's replay buffers). Some of its rounds need
    no update, and those tensors are saved with every checkpoint."""

    @abstractmethod
    def needs_updates(self, round_: int) -> bool:
        """False for a round the server trains alone (e.g. EcoFed on its replay buffers):
        it closes as soon as its tasks, if any, are sent."""
        return True

    @abstractmethod
    def kept(self) -> dict[str, tuple[str, Weights, dict]]:
        """Tensors saved with every checkpoint beside the JSON state, by name, as
        (codec, coded tensors, codec params) (e.g. EcoFed's replay buffers)."""
        return {}

    @abstractmethod
    def load_kept(self, kept: dict[str, tuple[str, Weights, dict]]) -> None:
        """Restore what ``kept`` returned (after a restart)."""
