"""FedAvg: every device trains the full model; weights averaged by sample count.

``FedAvgOptions.profiles`` restricts training to the devices of those profiles (the
"full width, only the devices that can afford it" baseline); the others stay
online and idle. ``FedAvgOptions.robust`` replaces the mean by a robust step (clip,
median/trimmed/Krum, central DP: ``strategies/robust.py``), folded over any codec.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from broker_server.robust import RobustOptions
from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update, Weights
from device_runtime.codecs.fedmrn import FedMRNCodec

# Codecs whose decoded updates are averaged as they are: a mean splits into partial sums.
MEAN_CODECS = ("fp32", "fp16", "int8", "sign", "fedmrn", "fedmrn-signed")


@dataclass(frozen=True)
class FedAvgOptions:
    profiles: tuple = ()  # only devices of these profiles train; empty: all
    robust: RobustOptions | None = None  # None: the plain sample-weighted mean
    dp_seed: int | None = None  # the DP noise's seed (None: OS entropy; simulations)
    share_cap: float = 0.0  # FedMRN: each device's share of the mask fold's samples (0: none)


@dataclass
class FedAvg(Strategy):
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    options: FedAvgOptions = field(default_factory=FedAvgOptions)
    name: str = "fedavg"
    coded_downlink = True  # a class attribute, not a field

    def __post_init__(self):
        if not isinstance(self.options, FedAvgOptions):
            raise ValueError(f"fedavg: options must be a FedAvgOptions, got "
                             f"{type(self.options).__name__}")
        if not 0 <= self.options.share_cap <= 1:
            raise ValueError(f"fedavg share_cap: expected a share in [0, 1] (0: none), got "
                             f"{self.options.share_cap}")
        self.robust = None
        if self.options.robust is not None:
            from broker_server.strategies.robust import RobustAggregation

            self.robust = RobustAggregation(self.options.robust, self.options.dp_seed)

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        only = set(self.options.profiles)
        out = {d.id: Assignment("full", self.epochs, self.batch_size, self.lr)
               for d in devices if not only or d.profile in only}
        if self.robust is not None:
            self.robust.assigned(len(out), len(devices))
        return out

    @classmethod
    def split_options(cls, codec: str, options: object | None) -> dict | None:
        # A robust rule is not a sum; a share cap needs the round's total.
        plain = getattr(options, "robust", None) is None and not getattr(options, "share_cap", 0)
        return {} if codec in MEAN_CODECS and plain else None

    @classmethod
    def for_worker(cls, options: dict) -> Strategy:
        return cls()

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        from broker_server.strategies.folds import mean_fold

        if self.robust is not None:
            return self.robust.fold(round_, global_weights, codec, ctx)
        if self.options.share_cap and isinstance(codec, FedMRNCodec):
            from broker_server.strategies.folds import FedMRNMean

            return FedMRNMean(codec, ctx, self.options.share_cap)
        return mean_fold(codec, ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        if self.robust is not None:
            ordered = sorted(updates, key=lambda u: u.device)
            return self.robust.combine([u.weights for u in ordered], global_weights,
                                       [float(u.samples) for u in ordered],
                                       [u.device for u in ordered])[0]
        return weighted_average([(u.weights, float(u.samples)) for u in updates])

    def report(self) -> dict:
        return self.robust.report() if self.robust is not None else {}

    def state(self) -> dict:
        return self.robust.state() if self.robust is not None else {}

    def load_state(self, state: dict) -> None:
        if self.robust is not None:
            self.robust.load_state(state)
