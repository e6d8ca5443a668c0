"""The control messages of the protocol: plan, status, task, control, heartbeat,
summary, rollout and the rollout's report.

Each is a typed dataclass. On the wire a message is a signed frame
(``seal``): kind = the class name in lower case, codec ``"json"``, and one
uint8 tensor ``"msg"`` holding the message as a JSON document, so the one
signature scheme of ``wire`` (header signed, body by its sha256) covers it
and binds it to the job, the round, the sender, a nonce and the addressee.
``unseal`` checks all of that and then validates the document at the
boundary, raising ``MessageError`` naming the field, the expected and the
actual value. ``parse`` validates a bare JSON document (files, tests).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np

from device_runtime import wire
from device_runtime.errors import EXIT_DATA, DeviceRuntimeError

if TYPE_CHECKING:
    from device_runtime.keys import PublicKey, Signer

MAX_MESSAGE = 256 * 1024


class MessageError(DeviceRuntimeError):
    exit_code = EXIT_DATA


_CHECKS = {
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v),
    "str": lambda v: isinstance(v, str),
    "bool": lambda v: isinstance(v, bool),
    "dict": lambda v: isinstance(v, dict),
    "list": lambda v: isinstance(v, list),
}


@dataclass(frozen=True)
class Plan:
    """Retained on ``plan``: what the job is."""

    job: str
    strategy: str
    codec: str
    rounds: int
    model: dict  # ModelConfig JSON: devices build the same model
    min_devices: int
    round_timeout: float
    train: dict = field(default_factory=dict)  # local training options
    variants: dict = field(default_factory=dict)  # variant -> {"tensors": {name: shape}}
    # The aggregator run that issued it: its control and tasks carry the same session,
    # so a device never acts on a stop or a task replayed from another run.
    session: str = ""
    issued: float = 0.0  # unix time; a device follows the newest plan it has seen


@dataclass(frozen=True)
class Status:
    """Retained on ``devices/<id>/status``; the broker publishes the will on a crash."""

    device: str
    state: str  # "online" | "offline" | "error"
    profile: str = ""
    samples: int = 0
    versions: dict = field(default_factory=dict)
    error: str = ""
    ts: float = 0.0
    session: str = ""  # the device's run: its will ("offline") names the same session


@dataclass(frozen=True, kw_only=True)
class Task:
    """On ``round/<r>/task/<id>``: what one device does this round (built by keyword:
    sixteen fields are too many to place by position)."""

    round: int
    device: str
    variant: str
    model_sha256: str  # sha256 of the model frame's bytes, checked before use
    deadline: float  # unix time
    epochs: int
    batch_size: int
    lr: float
    seed: int
    codec: str
    steps: int = 0  # > 0: exactly this many local minibatch steps instead of epochs
    model: dict = field(default_factory=dict)  # the variant's ModelConfig, if not the plan's
    uplink: str = "weights"  # "logits": the trained model's logits on the "public" asset
    assets: dict = field(default_factory=dict)  # asset name -> sha256 of its frame
    # The coded downlink: a device holding the model frame with sha256 base_sha256 may
    # fetch the (small) sync frame instead, apply it, and check the result's sha256.
    base_sha256: str = ""
    sync_sha256: str = ""
    # Bound into the task's signature and the update's: the device answers a nonce
    # once, and the aggregator accepts an update only for the nonce it sent.
    nonce: str = ""
    session: str = ""  # the plan's session


def task_deadline(seconds: float, now: float) -> float:
    """``now + seconds``, up to the next whole second: a whole float's JSON has the same
    length every time (the deadline sent at 12.5 s past a second would be one byte
    longer than one at 12.25 s), so the bytes a run counts do not depend on the clock."""
    return float(math.ceil(now + seconds))


SECONDS_WIDTH = 10  # "00002.0318": up to 99999.9999 s


def fixed_seconds(seconds: float) -> str:
    """A measured duration for a frame's meta, as text of a fixed width: a number's JSON
    is as long as its digits, and an update's bytes (which runs count) must not depend
    on how long this machine took. ``seconds_of`` reads it back."""
    return f"{min(max(seconds, 0.0), 99999.9999):0{SECONDS_WIDTH}.4f}"


def seconds_of(value: object) -> float:
    """A duration from a frame's meta: ``fixed_seconds`` text or a plain number (older
    devices); 0.0 for anything else (meta is the device's word)."""
    if isinstance(value, str) and len(value) <= SECONDS_WIDTH:
        try:
            value = float(value)
        except ValueError:
            return 0.0
    if isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value):
        return float(value)
    return 0.0


@dataclass(frozen=True)
class Control:
    """On ``control``: the job's end (or a pause)."""

    action: str  # "stop" | "pause"
    reason: str = ""


@dataclass(frozen=True)
class Heartbeat:
    """On ``heartbeat`` every ~10 s while the aggregator runs, bound to the plan's
    session: a device waiting for a task can tell "server busy" (training alone,
    evaluating, a slow fold) from "job gone" (its idle timeout counts from the last)."""

    completed: int  # rounds closed so far
    ts: float  # unix time it was sent


@dataclass(frozen=True)
class Summary:
    """Retained on ``summary``: the last closed round's figures, for dashboards and
    scrapers that only read (docs/protocol.md, "Round summary"). Negative accuracy or
    loss: not measured."""

    round: int
    rounds: int
    closed: float  # unix time the round closed
    seconds: float
    devices_assigned: int
    devices_reporting: int
    devices_online: int
    uplink_bytes: int
    downlink_bytes: int
    accuracy: float = -1.0
    loss: float = -1.0  # sample-weighted mean training loss of the accepted updates
    reporting: list = field(default_factory=list)  # device ids accepted this round
    refused: list = field(default_factory=list)  # device ids the guard refused
    rejected_by_reason: dict = field(default_factory=dict)  # reason -> count, this process
    profiles: dict = field(default_factory=dict)  # profile -> {"devices", "loss", ...}
    cpu_seconds: float = 0.0  # the aggregator process's user + system CPU so far
    rss_bytes: int = 0
    history: list = field(default_factory=list)  # earlier rounds, compact (protocol.md)
    session: str = ""


@dataclass(frozen=True, kw_only=True)
class Rollout:
    """Retained on ``rollout/<device>``, sealed to the device with the rollout's id as
    nonce and the target version as round (``fedge rollout``, docs/protocol.md)."""

    rollout: str  # the rollout's id: the frame's nonce
    action: str  # "install" | "rollback"
    version: int  # the version to run after it
    replaces: int  # the version it replaces (rollback: the one to leave)
    manifest_sha256: str = ""  # install: content sha256 of the release's manifest frame
    issued: float = 0.0  # unix time; a device takes none older than the last it took


@dataclass(frozen=True, kw_only=True)
class RolloutReport:
    """Retained on ``rollouts``, from ``fedge rollout`` at every step, for watchers such
    as ``fedge dashboard`` (docs/protocol.md, "Staged rollout"): where the rollout is."""

    rollout: str  # its id: the frame's nonce
    version: int  # the version being rolled out: the frame's round
    stage: str  # canary | all | done | rolling-back | rolled-back
    reason: str = ""  # why the canary failed
    canary: list = field(default_factory=list)  # device ids
    rest: list = field(default_factory=list)
    previous: dict = field(default_factory=dict)  # device -> the version it ran before
    devices: dict = field(default_factory=dict)  # device -> its last report (protocol.md)
    omitted: int = 0  # reports of healthy devices left out to fit MAX_MESSAGE
    hold_from: float = 0.0  # unix time the canary's hold began (0: not yet)
    hold: float = 0.0  # its length in seconds
    history: list = field(default_factory=list)  # [unix time, stage, note], oldest first
    updated: float = 0.0  # unix time of this report; a watcher takes none older


M = TypeVar("M")


CODEC = "json"
_LIMITS = wire.Limits(max_tensors=1, max_body=MAX_MESSAGE)


@dataclass(frozen=True)
class Sealed(Generic[M]):
    """A received message and the signed frame it came in (job, round, sender,
    nonce, addressee and signer's key id)."""

    msg: M
    frame: wire.Frame


def dump(msg) -> bytes:
    """The message as a JSON document (unsigned: for files and reports, not the wire)."""
    # Its fields, not ``dataclasses.asdict``: every field is a JSON value already, and
    # asdict's deep copy was a third of the time sealing a task (0.093 -> 0.065 ms).
    return json.dumps({f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)},
                      sort_keys=True).encode()


def seal(msg, job: str, sender: str, signer: Signer, round_: int = 0, nonce: str = "",
         to: str = "") -> bytes:
    """The message as a frame signed by ``signer``, bound to job, round, sender, nonce
    and addressee."""
    doc = np.frombuffer(dump(msg), np.uint8)
    return wire.encode(wire.Frame(type(msg).__name__.lower(), job, round_, sender, CODEC,
                                  {"msg": doc}, nonce=nonce, to=to), _LIMITS, signer)


def unseal(cls: type[M], payload: bytes, key: PublicKey, job: str, sender: str | None = None,
           round_: int | None = None, nonce: str | None = None, to: str | None = None
           ) -> Sealed[M]:
    """The message in a frame signed by ``key`` for ``job`` (and, where given, from
    ``sender``, of round ``round_``, with that nonce and addressee); WireError if the
    frame is not that, MessageError if the document is malformed."""
    name = cls.__name__.lower()
    frame = wire.decode(payload, wire.Expect(
        kind=name, job=job, round=round_, codec=CODEC,
        devices=None if sender is None else frozenset({sender}),
        tensors={"msg": wire.TensorSpec("uint8", (None,))}, nonce=nonce, to=to), _LIMITS, key)
    return Sealed(parse(cls, frame.tensors["msg"].tobytes()), frame)


def parse(cls: type[M], payload: bytes) -> M:
    """Validate a bare JSON document as message ``cls``."""
    name = cls.__name__.lower()
    if len(payload) > MAX_MESSAGE:
        raise MessageError(f"{name}: {len(payload)} bytes exceeds {MAX_MESSAGE}")
    try:
        data = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise MessageError(f"{name}: not a JSON document: {e}") from None
    if not isinstance(data, dict):
        raise MessageError(f"{name}: expected a JSON object, got {type(data).__name__}")
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MessageError(f"{name}.{f.name}: missing")
            continue
        v = data[f.name]
        if not _CHECKS[f.type](v):
            raise MessageError(f"{name}.{f.name}: expected {f.type}, got "
                               f"{type(v).__name__} {str(v)[:40]!r}")
        values[f.name] = float(v) if f.type == "float" else v
    return cls(**values)
