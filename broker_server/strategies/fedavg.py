"""FedAvg: every device trains the full model; weights averaged by sample count."""
from __future__ import annotations

from dataclasses import dataclass

from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update, Weights


@dataclass
class FedAvg(Strategy):
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    name: str = "fedavg"

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        return {d.id: Assignment("full", self.epochs, self.batch_size, self.lr) for d in devices}

    def fold(self, round_: int, global_weights: Weights, codec, ctx):
        from broker_server.strategies.folds import mean_fold

        return mean_fold(codec, ctx)

    def aggregate(self, round_: int, global_weights: Weights, updates: list[Update]) -> Weights:
        return weighted_average([(u.weights, float(u.samples)) for u in updates])
