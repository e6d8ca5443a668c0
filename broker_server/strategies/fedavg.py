"""FedAvg: every device trains the full model; weights averaged by sample count.

``FedAvgOptions.profiles`` restricts training to the devices of those profiles (the
"full width, only the devices that can afford it" baseline); the others stay
online and idle.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update, Weights

# Codecs whose decoded updates are averaged as they are: a mean splits into partial sums.
MEAN_CODECS = ("fp32", "fp16", "int8", "sign", "fedmrn", "fedmrn-signed")


@dataclass(frozen=True)
class FedAvgOptions:
    profiles: tuple = ()  # only devices of these profiles train; empty: all


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

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        only = set(self.options.profiles)
        return {d.id: Assignment("full", self.epochs, self.batch_size, self.lr)
                for d in devices if not only or d.profile in only}

    @classmethod
    def split_options(cls, codec: str, options: object | None) -> dict | None:
        return {} if codec in MEAN_CODECS else None

    @classmethod
    def for_worker(cls, options: dict) -> Strategy:
        return cls()

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        from broker_server.strategies.folds import mean_fold

        return mean_fold(codec, ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        return weighted_average([(u.weights, float(u.samples)) for u in updates])
