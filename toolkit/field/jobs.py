"""Typed jobs: what ``fedge serve`` (and ``fedge demo``, ``fedge worker``) hand the library.

The CLI turns its flags into a frozen ``ServeJob``; ``field.run_serve``, ``scaleout`` and
the demo take nothing else, so no library code reads an ``argparse.Namespace``. Each part
checks itself when built: a bad value is a one-line ``UsageError`` naming the flag, what
was expected and what was given (the flag, since that is what the user typed).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from broker_server.guard import MAX_SAMPLES, NORM_BOUND
from device_runtime.transport.base import DEFAULT_MAX_PAYLOAD
from toolkit.errors import UsageError



def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise UsageError(f"{flag}: expected >= 1, got {value}")


@dataclass(frozen=True)
class RoundSettings:
    """How many rounds, the quorum and deadline of each, and the devices' local training."""
    rounds: int = 10
    min_devices: int = 2
    round_timeout: float = 60.0  # seconds
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.02

    def __post_init__(self) -> None:
        for name in ("rounds", "min_devices", "epochs", "batch_size"):
            _at_least_one(f"--{name.replace('_', '-')}", getattr(self, name))
        for name in ("round_timeout", "lr"):
            if getattr(self, name) <= 0:
                raise UsageError(f"--{name.replace('_', '-')}: expected > 0, got "
                                 f"{getattr(self, name)}")


@dataclass(frozen=True)
class GuardLimits:
    """What one update may weigh and change (broker_server/guard.py)."""
    max_samples: int = MAX_SAMPLES
    norm_bound: float = NORM_BOUND  # x the median change RMS; inf: off

    def __post_init__(self) -> None:
        _at_least_one("--max-samples", self.max_samples)
        if not self.norm_bound >= 1.0:  # NaN too
            raise UsageError(f"--norm-bound: expected a factor >= 1 (or inf), got "
                             f"{self.norm_bound}")


@dataclass(frozen=True)
class BrokerSettings:
    """Where the job's messages go and who the aggregator is on it."""
    url: str | None = None  # None: an embedded broker started for the job
    credentials: str | None = None  # fedge secure init's aggregator.json (TLS, password)
    signing_key: str | None = None  # default: the credentials', else $FEDGE_HOME's
    registry: str | None = None  # the fleet's device keys; default: the credentials'
    max_payload: int = DEFAULT_MAX_PAYLOAD

    def __post_init__(self) -> None:
        if self.credentials and not self.url:
            raise UsageError("--credentials needs --broker: the embedded broker has no TLS")


@dataclass(frozen=True)
class ScaleOutSettings:
    """``--workers N``: fold the updates in N local worker processes."""
    workers: int

    def __post_init__(self) -> None:
        _at_least_one("--workers", self.workers)


@dataclass(frozen=True)
class EvalSettings:
    """``--eval-every K``: the devices score the global model on held-out data every K
    rounds (and after the last); ``--holdout``: the part of each shard held out."""
    every: int = 0  # 0: off
    holdout: float = 0.2

    def __post_init__(self) -> None:
        if self.every < 0:
            raise UsageError(f"--eval-every: expected >= 0 (0: off), got {self.every}")
        if not 0.0 < self.holdout < 1.0:
            raise UsageError(f"--holdout: expected a fraction in (0, 1), got {self.holdout}")


@dataclass(frozen=True)
class ServeJob:
    """One ``fedge serve`` job: everything ``field.run_serve`` needs."""
    job: str
    checkpoint: Path
    state_dir: Path
    strategy: str = "fedavg"
    codec: str = "fp32"
    downlink: str = "fp32"  # fp32 (whole model) or a codec for the change
    strategy_options: object | None = None  # the strategy's typed options; None: defaults
    rounds: RoundSettings = field(default_factory=RoundSettings)
    guard: GuardLimits = field(default_factory=GuardLimits)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    scale_out: ScaleOutSettings | None = None  # None: the aggregator folds alone
    evaluation: EvalSettings = field(default_factory=EvalSettings)
    profiles: str = "all"  # the fleet: comma list of profile names, or all
    profiles_file: str | None = None
    eval_data: Path | None = None  # default: the checkpoint's dataset
    root_data: Path | None = None  # --root-data: labelled x, y for zeno, fltrust
    report: Path | None = None  # --json: the report is written here too
    custom_models: tuple[str, ...] = ()  # --allow-custom-model specs

    def __post_init__(self) -> None:
        from device_runtime.topics import check_id

        check_id("job", self.job)
        if self.scale_out is not None and not self.broker.url:
            raise UsageError("--workers needs --broker (Mosquitto, EMQX, HiveMQ, ...): the "
                             "embedded broker (amqtt) has no shared subscriptions")
        if self.scale_out is not None and self.evaluation.every:
            raise UsageError("--eval-every: expected without --workers (the workers take "
                             "the devices' answers), got both")
        rule = getattr(getattr(self.strategy_options, "robust", None), "rule", "")
        if rule in ("zeno", "fltrust") and self.root_data is None:
            raise UsageError(f"--robust {rule}: expected --root-data FILE (an .npz of "
                             f"labelled x and y the aggregator holds), got none")


@dataclass(frozen=True)
class WorkerJob:
    """One ``fedge worker``: folds a share of a scaled-out job's updates."""
    broker: str
    job: str
    worker: str  # this worker's id, unique in the job
    state_dir: Path
    credentials: str | None = None
    signing_key: str | None = None
    registry: str | None = None
    idle_timeout: float | None = None  # seconds without a round, then exit
    parent_pid: int | None = None  # serve's: the worker exits when it is gone


@dataclass(frozen=True)
class DemoJob:
    """One ``fedge demo``: MNIST-1D over ``devices`` local device processes."""
    devices: int = 8
    rounds: int = 25
    alpha: float = 0.5  # Dirichlet concentration of the non-IID split
    seed: int = 0
    round_timeout: float = 30.0
    epochs: int = 2
    batch_size: int = 32
    lr: float = 0.02
    eval_every: int = 5  # devices score the global model every K rounds (0: off)
    # FedMRN masks up (1 bit a weight), the change down as int8: 0.93 after 25 rounds
    # against FedAvg fp32's 0.95 at 6x less traffic (FedMRN down too: 0.88, as it has no
    # error feedback; docs/results/demo.md)
    codec: str = "fedmrn"
    downlink: str = "int8"
    variants: bool = True  # export each profile's variant of the final model at the end
    broker: str | None = None  # None: the embedded broker
    workdir: Path | None = None  # None: $FEDGE_HOME/demo, cleared by each demo
    report: Path | None = None  # None: demo.json in the work dir; a PNG plot goes beside

    def __post_init__(self) -> None:
        if self.devices < 2:
            raise UsageError(f"--devices: expected >= 2, got {self.devices}")
