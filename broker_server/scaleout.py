"""Scale-out: what the coordinator and its aggregator workers say to each other, and
which strategy and codec combinations can be split over workers.

The messages are typed dataclasses, signed frames (``messages.seal``/``unseal``) read (field types
checked at the boundary); what that cannot see (the contents of nested dicts)
is checked here, and every error names the field, what was expected and what came.
Topics are in ``device_runtime.topics`` (``work``, ``worker``, ``shared_update``);
docs/operations.md, "Scale-out", has the whole exchange.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from broker_server.errors import BrokerServerError
from broker_server.strategies import STRATEGIES, Strategy, factory
from broker_server.strategies.fedavg import MEAN_CODECS
from device_runtime import messages
from device_runtime.errors import EXIT_USAGE
from device_runtime.keys import PublicKey, Signer
from device_runtime.messages import MessageError
from device_runtime.topics import check_id

VALID = ("fedavg with --codec " + ", ".join(MEAN_CODECS) + "; signsgd with --codec sign "
         "and --sign-decoder mv")


class ScaleOutError(BrokerServerError):
    """A job that cannot run with workers (strategy, codec, broker, sizes)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class WorkRound:
    """Retained on ``workers/round``: the open round, then (``state`` "close") which
    devices each worker's partial must hold; "done" when the job ends."""

    round: int
    session: str  # the coordinator's run: a new one asks workers to report their updates again
    state: str  # "open" | "close" | "done"
    strategy: str
    codec: str
    seed: int  # the round's codec seed (CodecContext.seed)
    models: dict  # variant -> sha256 of the round's model frame
    devices: dict  # device -> {"variant": str, "samples": int, "nonce": str}: its task
    options: dict = field(default_factory=dict)  # the fold's strategy options (decoder)
    close: dict = field(default_factory=dict)  # worker -> [devices], at "close"
    # The aggregator's guard for the round (broker_server/guard.py): {"factor": float or
    # None (no bound), "max_samples": int, "previous": [last round's change norms],
    # "registered": {device: samples}}: a worker bounds weights and norms as it would.
    guard: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Accepted:
    """On ``workers/<id>/accepted``: one update a worker validated, folded and saved."""

    worker: str
    round: int
    device: str
    samples: int
    sha256: str  # of the update's payload
    nbytes: int
    meta: dict  # the update frame's meta (train_seconds, variant, ...)
    norm: float = 0.0  # the guard's change RMS (0: nothing measured, or no change)


@dataclass(frozen=True)
class Refused:
    """On ``workers/<id>/refused``: an update the guard refused, so that the round does
    not wait for its device (as the aggregator's own guard does)."""

    worker: str
    round: int
    device: str
    reason: str


@dataclass(frozen=True)
class WorkerStatus:
    """Retained on ``workers/<id>/status``; the broker publishes the will (offline)."""

    worker: str
    state: str  # "online" | "offline"
    ts: float = 0.0
    counts: dict = field(default_factory=dict)


def parse_work(payload: bytes, key: PublicKey, job: str) -> WorkRound:
    """The round message, signed with the aggregator's key (workers hold it too)."""
    w = messages.unseal(WorkRound, payload, key, job, sender="server").msg
    if w.state not in ("open", "close", "done"):
        raise MessageError(f"workround.state: expected open, close or done, got {w.state!r}")
    for d, task in w.devices.items():
        if not isinstance(task, dict) or not isinstance(task.get("variant"), str) or \
                not isinstance(task.get("samples"), int) or isinstance(task["samples"], bool) \
                or not isinstance(task.get("nonce"), str):
            raise MessageError(f"workround.devices[{d!r}]: expected {{variant: str, "
                               f"samples: int, nonce: str}}, got {task!r}")
    for wid, devices in w.close.items():
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise MessageError(f"workround.close[{wid!r}]: expected a list of device ids, "
                               f"got {devices!r}")
    _check_guard(w.guard)
    for variant, sha in w.models.items():
        if not isinstance(sha, str) or len(sha) != 64:
            raise MessageError(f"workround.models[{variant!r}]: expected a sha256, got {sha!r}")
    return w


def _check_guard(g: dict) -> None:
    if not g:
        return  # a coordinator without a guard: weights as claimed, no norm bound
    factor, cap, prev, reg = (g.get(k) for k in ("factor", "max_samples", "previous",
                                                 "registered"))
    ok = (factor is None or _number(factor) and factor > 0) and _count(cap) and \
        isinstance(prev, list) and all(_number(v) and v >= 0 for v in prev) and \
        isinstance(reg, dict) and all(_count(v) for v in reg.values())
    if not ok:
        raise MessageError(f"workround.guard: expected {{factor: number > 0 or null, "
                           f"max_samples: int > 0, previous: [numbers >= 0], registered: "
                           f"{{device: int > 0}}}}, got {g!r}")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def parse_refused(payload: bytes, worker: str, key: PublicKey, job: str) -> Refused:
    r = messages.unseal(Refused, payload, key, job, sender=worker).msg
    if r.worker != worker:
        raise MessageError(f"refused.worker: expected {worker!r} (the topic's), "
                           f"got {r.worker!r}")
    return r


def parse_accepted(payload: bytes, worker: str, key: PublicKey, job: str) -> Accepted:
    a = messages.unseal(Accepted, payload, key, job, sender=worker).msg
    if a.worker != worker:
        raise MessageError(f"accepted.worker: expected {worker!r} (the topic's), "
                           f"got {a.worker!r}")
    if a.samples <= 0 or a.nbytes <= 0 or a.norm < 0:
        raise MessageError(f"accepted.samples, nbytes, norm: expected > 0, > 0, >= 0, got "
                           f"{a.samples}, {a.nbytes}, {a.norm}")
    return a


def status(worker: str, state: str, signer: Signer, job: str, counts: dict | None = None
           ) -> bytes:
    """A worker's status, signed with the aggregator's key it runs with."""
    return messages.seal(WorkerStatus(worker, state, time.time(), dict(counts or {})), job,
                         worker, signer)


def parse_status(payload: bytes, worker: str, key: PublicKey, job: str) -> WorkerStatus:
    s = messages.unseal(WorkerStatus, payload, key, job, sender=worker).msg
    if s.worker != worker:
        raise MessageError(f"workerstatus.worker: expected {worker!r}, got {s.worker!r}")
    return s


def check_split(strategy: str, codec: str, options: object = None) -> dict:
    """The fold options the workers need (JSON), or ScaleOutError naming the valid
    combinations: a fold splits only when its aggregate is a sum of the updates."""
    rule = _rule(strategy)
    split = rule.split_options(codec, options) if rule is not None else None
    if split is not None:
        return split
    raise ScaleOutError(f"--workers: {strategy} with --codec {codec} cannot be split over "
                        f"workers; valid: {VALID}")


def fold_strategy(name: str, options: dict) -> Strategy:
    """The strategy a worker folds with: only its fold matters, so defaults but the
    options ``check_split`` returned."""
    rule = _rule(name)
    strategy = rule.for_worker(options) if rule is not None else None
    if strategy is not None:
        return strategy
    raise ScaleOutError(f"workround: {name} with options {options!r} cannot be split; "
                        f"valid: {VALID}")


def _rule(name: str):
    """The strategy class registered as ``name`` (its scale-out hooks), if the
    aggregator knows it as a class."""
    if name not in STRATEGIES.names():
        return None
    rule = factory(name)
    return rule if isinstance(rule, type) and issubclass(rule, Strategy) else None


def check_worker_id(worker: str) -> str:
    if worker == "round":  # workers/round is the coordinator's topic
        raise ScaleOutError("worker id: 'round' is reserved")
    return check_id("worker", worker)


__all__ = ["WorkRound", "Accepted", "Refused", "WorkerStatus", "ScaleOutError", "parse_work",
           "parse_accepted", "parse_refused", "status", "check_split", "fold_strategy",
           "check_worker_id", "VALID", "MEAN_CODECS"]
