"""The options of the strategies whose server side is torch (EcoFed, REFT, dpfl), apart
from both their specs (``toolkit/strategies/<name>.py``, light: the CLI reads them) and
their server code (``toolkit/strategies/server/<name>.py``, torch), so that each of
those imports them and neither imports the other at module level."""
from __future__ import annotations

from dataclasses import dataclass, field

# EcoFed's tail at the start: the pre-trained model's ("pretrained", fedge), or a fresh
# initialisation with only the device layers pre-trained ("fresh", the paper's).
TAIL_INITS = ("pretrained", "fresh")


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
    tail_init: str = "pretrained"  # one of TAIL_INITS

    @classmethod
    def paper(cls) -> "EcoFedOptions":
        """EcoFed as published (Wu et al., arXiv 2304.05495; docs/ALGORITHMS.md, section 2):
        one tail per device averaged with equal weights, 50 SGD steps at batch 10 a round
        (about one pass over a device's buffer), lr 0.01 with momentum 0.9, period 2, and
        only the device layers pre-trained (the tail starts fresh). The paper pre-trains
        on another dataset; fedge has none beside MNIST-1D, so the public split stands in."""
        return cls(period=2, iterations=50, lr=0.01, momentum=0.9, batch_size=10,
                   shared_tail=False, tail_init="fresh")

    def check(self) -> None:
        for name in ("period", "iterations", "batch_size", "pretrain_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name ==
                                                                       "pretrain_epochs" else 1):
                raise ValueError(f"ecofed {name}: expected a positive int, got {v!r}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"ecofed lr/momentum: expected lr > 0 and momentum in [0, 1), got "
                             f"{self.lr}, {self.momentum}")
        if self.tail_init not in TAIL_INITS:
            raise ValueError(f"ecofed tail_init: expected one of {', '.join(TAIL_INITS)}, got "
                             f"{self.tail_init!r}")


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
    # Prune once, in the first round, and keep each profile's channels for the whole
    # job (True, the paper's "one-shot variable pruning"); False: prune the new global
    # model anew every round.
    one_shot: bool = False

    @classmethod
    def paper(cls) -> "REFTOptions":
        """REFT as described (Desai et al., arXiv 2308.13662; docs/ALGORITHMS.md, section
        3): one-shot variable pruning, then knowledge distillation alone into the global
        model (no averaging of the clients' weights back into place)."""
        return cls(average_first=False, one_shot=True)

    def check(self) -> None:
        for name in ("temperature", "distill_lr"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"reft {name}: expected a number > 0, got {v!r}")
        for name in ("distill_epochs", "distill_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (name == "distill_batch"):
                raise ValueError(f"reft {name}: expected an int >= "
                                 f"{int(name == 'distill_batch')}, got {v!r}")
        if self.uplink not in ("weights", "logits"):
            raise ValueError(f"reft uplink: expected 'weights' or 'logits', got "
                             f"{self.uplink!r}")


@dataclass(frozen=True)
class DPFLOptions:
    split_after: int | None = None  # None: the planner's cut per profile
    momentum: float = 0.9
    weight_decay: float = 5e-4  # as the devices' local SGD
    # The server's step order: True a step of every device at a time, in device order
    # (reproducible); False as the batches arrive; None: True in fedge simulate, False in
    # fedge serve (broker_server/batches.py)
    lockstep: bool | None = None


__all__ = ["EcoFedOptions", "REFTOptions", "DPFLOptions", "TAIL_INITS"]
