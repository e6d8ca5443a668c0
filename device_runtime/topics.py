"""Topic names under ``fedge/<job>/`` (the table in docs/protocol.md)."""
from __future__ import annotations

import re

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class NameError_(DeviceRuntimeError):
    exit_code = EXIT_USAGE


def check_id(kind: str, value: str) -> str:
    """Job and device ids become topic levels and file names: keep them plain."""
    if not isinstance(value, str) or not _ID.match(value):
        raise NameError_(f"{kind} id: expected 1-64 of [A-Za-z0-9._-] starting with a letter "
                         f"or digit, got {value!r}")
    return value


class Topics:
    def __init__(self, job: str):
        self.job = check_id("job", job)
        self.root = f"fedge/{job}"

    @property
    def plan(self) -> str:
        return f"{self.root}/plan"

    @property
    def control(self) -> str:
        return f"{self.root}/control"

    @property
    def heartbeat(self) -> str:
        """Aggregator to devices, every ~10 s while it runs (not retained)."""
        return f"{self.root}/heartbeat"

    @property
    def summary(self) -> str:
        """Retained, aggregator to readers (dashboards): the last closed round's figures."""
        return f"{self.root}/summary"

    def asset(self, name: str = "+") -> str:
        """Retained, once per job: a frame some tasks need (e.g. REFT's public inputs)."""
        return f"{self.root}/asset/{name}"

    def status(self, device: str = "+") -> str:
        return f"{self.root}/devices/{device}/status"

    def model(self, round_: int | str, variant: str) -> str:
        return f"{self.root}/round/{round_}/model/{variant}"

    def sync(self, round_: int | str, variant: str) -> str:
        """Retained: the model's coded change from the round before (the coded downlink)."""
        return f"{self.root}/round/{round_}/sync/{variant}"

    def task(self, round_: int | str, device: str) -> str:
        return f"{self.root}/round/{round_}/task/{device}"

    def update(self, round_: int | str = "+", device: str = "+") -> str:
        return f"{self.root}/round/{round_}/update/{device}"

    def acts(self, round_: int | str = "+", device: str = "+") -> str:
        """Split learning (dpfl): one minibatch's activations at the cut, device to server."""
        return f"{self.root}/round/{round_}/acts/{device}"

    def grad(self, round_: int | str = "+", device: str = "+") -> str:
        """Split learning (dpfl): the loss gradient for those activations, server to device."""
        return f"{self.root}/round/{round_}/grad/{device}"

    # Staged rollout of inference exports (fedge rollout, device_runtime/rollout.py).
    def release(self, version: int | str, name: str = "+") -> str:
        """Retained, from the operator: an export version's files, each a signed frame:
        ``manifest`` (manifest.json and its signature) and one per artifact, named by
        its sha256."""
        return f"{self.root}/release/{version}/{name}"

    def rollout(self, device: str = "+") -> str:
        """Retained, from the operator to one device: install a version, or go back."""
        return f"{self.root}/rollout/{device}"

    @property
    def rollouts(self) -> str:
        """Retained, from the operator to watchers (dashboards): where the newest rollout
        of the job is, a signed ``RolloutReport``."""
        return f"{self.root}/rollouts"

    # Scale-out (broker_server/workers.py): the coordinator and its aggregator workers.
    @property
    def work(self) -> str:
        """Retained, coordinator to workers: the open round, then which devices to merge."""
        return f"{self.root}/workers/round"

    def worker(self, worker: str = "+", what: str = "+") -> str:
        """Worker to coordinator: ``status`` (retained, will "offline"), ``accepted`` (one
        per update it folded in), ``refused`` (one per update its guard refused) and
        ``partial`` (its share of the round, a frame)."""
        return f"{self.root}/workers/{worker}/{what}"

    def shared_update(self, group: str) -> str:
        """Every update, each delivered to one member of ``group`` (MQTT shared
        subscription; the broker must support ``$share``)."""
        return f"$share/{group}/{self.update()}"

    def parse(self, topic: str) -> dict:
        """The fields of one of our topics: {"kind", "round"?, "device"?, "variant"?}."""
        parts = topic.split("/")
        if parts[:2] != ["fedge", self.job]:
            return {"kind": "foreign"}
        rest = parts[2:]
        if rest in (["plan"], ["control"], ["heartbeat"], ["summary"], ["rollouts"]):
            return {"kind": rest[0]}
        if len(rest) == 2 and rest[0] == "asset":
            return {"kind": "asset", "asset": rest[1]}
        if rest == ["workers", "round"]:
            return {"kind": "work"}
        if len(rest) == 3 and rest[0] == "workers" and \
                rest[2] in ("status", "accepted", "refused", "partial"):
            return {"kind": "worker", "worker": rest[1], "what": rest[2]}
        if len(rest) == 3 and rest[0] == "release" and rest[1].isdigit():
            return {"kind": "release", "version": int(rest[1]), "name": rest[2]}
        if len(rest) == 2 and rest[0] == "rollout":
            return {"kind": "rollout", "device": rest[1]}
        if len(rest) == 3 and rest[0] == "devices" and rest[2] == "status":
            return {"kind": "status", "device": rest[1]}
        if len(rest) == 4 and rest[0] == "round" and rest[1].isdigit():
            key = {"model": "variant", "sync": "variant", "task": "device",
                   "update": "device", "acts": "device", "grad": "device"}.get(rest[2])
            if key:
                return {"kind": rest[2], "round": int(rest[1]), key: rest[3]}
        return {"kind": "unknown"}


def sender_of(topic: str) -> str:
    """Who published ``topic``, as far as its name says: ``device/<id>`` for a device's
    status, updates and activations, ``worker/<id>`` for an aggregator worker's topics,
    ``aggregator`` for the rest of a job's topics, the topic itself for anything else.

    The name, not a frame header, because the broker's ACL (``fedge secure init``)
    lets a device publish only on its own topics, while a header says what its sender
    chose to write."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != "fedge":
        return topic
    try:
        fields = Topics(parts[1]).parse(topic)
    except NameError_:
        return topic
    kind = fields["kind"]
    if kind in ("status", "update", "acts"):
        return f"device/{fields['device']}"
    if kind == "worker":
        return f"worker/{fields['worker']}"
    return topic if kind == "unknown" else "aggregator"
