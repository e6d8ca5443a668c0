"""The options of the strategies whose server side is torch (EcoFed, REFT, dpfl), apart
from both their specs (``toolkit/strategies/<name>.py``, light: the CLI reads them) and
their server code (``toolkit/strategies/server/<name>.py``, torch), so that each of
those imports them and neither imports the other at module level."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EcoFedOptions:
    period: int = 2  # devices send every ``period`` rounds
    iterations: int = 200  # server SGD steps per tail per round (50 in the paper: too few here)
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 32
    shared_tail: bool = False
    split_after: int | None = None  # None: the planner's choice for the fleet
    pretrain_epochs: int = 30  # ``fedge simulate``: the head's pre-training on public data

    def check(self) -> None:
        for name in ("period", "iterations", "batch_size", "pretrain_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name ==
                                                                       "pretrain_epochs" else 1):
                raise ValueError(f"ecofed {name}: expected a positive int, got {v!r}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"ecofed lr/momentum: expected lr > 0 and momentum in [0, 1), got "
                             f"{self.lr}, {self.momentum}")


@dataclass(frozen=True)
class REFTOptions:
    temperature: float = 3.0
    distill_epochs: int = 3
    distill_lr: float = 0.01
    distill_batch: int = 64
    # Per profile, the share of the full model's MACs; empty: the planner's.
    fractions: dict = field(default_factory=dict)
    # "weights": devices send their pruned models; "logits": only their logits on the
    # public split (FedMD), whatever the model's size.
    uplink: str = "weights"
    # Start the student from the entry-wise average of the client models mapped back to
    # their places in the global model (FedDF's initialization), then distil. False:
    # distil into last round's global model alone.
    average_first: bool = True


@dataclass(frozen=True)
class DPFLOptions:
    split_after: int | None = None  # None: the planner's cut per profile
    momentum: float = 0.9
    weight_decay: float = 5e-4  # as the devices' local SGD
    # The server's step order: True a step of every device at a time, in device order
    # (reproducible); False as the batches arrive; None: True in fedge simulate, False in
    # fedge serve (broker_server/batches.py)
    lockstep: bool | None = None


__all__ = ["EcoFedOptions", "REFTOptions", "DPFLOptions"]
