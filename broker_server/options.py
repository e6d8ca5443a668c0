"""What one aggregator run is: the job, its rounds and the bounds on updates, as
``fedge serve`` (toolkit/field/jobs.py ``ServeJob``) hands them to ``Aggregator``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker_server.guard import MAX_SAMPLES, NORM_BOUND


@dataclass(frozen=True)
class ServeOptions:
    job: str
    state_dir: Path
    strategy: str = "fedavg"
    codec: str = "fp32"
    rounds: int = 10
    min_devices: int = 2
    round_timeout: float = 60.0
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    seed: int = 0
    wait_timeout: float | None = None  # for the first min_devices; None waits forever
    strategy_options: object | None = None  # the strategy's own typed options
    downlink: str = "fp32"  # how the model reaches devices: fp32 whole, or a coded change
    max_samples: int = MAX_SAMPLES  # the most samples any update counts with (guard.py)
    norm_bound: float = NORM_BOUND  # refuse a change RMS above this x the median (guard.py)
    eval_every: int = 0  # devices score the global model every K rounds (evaluation.py)
    holdout: float = 0.2  # with eval_every: the part of each shard devices never train on


__all__ = ["ServeOptions"]
