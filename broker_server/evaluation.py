"""Evaluation on the devices (``fedge serve --eval-every K``): the devices score the
global model on the held-out part of their own data, and the aggregator reports the
sample-weighted mean, the mean per profile and the spread over devices.

After rounds K, 2K, ... and the last, once the round's aggregate is known and before
it is checkpointed, ``DeviceEvaluation.run`` publishes the aggregate as the next
round's (retained, signed) model frame, sends each online device an ``evaluate`` task
(its own nonce: ``nonce(round, "<device>/eval")``, so it is never the training task's),
and collects the answers until all are in or the round timeout passes: an update
frame with no tensors whose signed meta holds ``samples``, ``loss`` and ``accuracy``.
No quorum: the summary says how many devices reported. The devices hold out
``holdout`` of their shard from the start of the job (the plan's ``train.holdout``).
"""
from __future__ import annotations

import math
import time

from broker_server.intake import pump
from device_runtime import messages, wire
from device_runtime.errors import WireError
from device_runtime.transport.base import RECONNECTED

SERVER = "server"


class DeviceEvaluation:
    """The evaluation phase of an ``Aggregator`` (``agg``), every ``every`` rounds."""

    def __init__(self, agg, every: int):
        self.agg, self.every = agg, every

    def plan(self) -> dict:
        """The plan's ``train`` entries: what part of their shard devices hold out."""
        return {"holdout": self.agg.opts.holdout} if self.every else {}

    def due(self, r: int) -> bool:
        return self.every > 0 and (r % self.every == 0 or r == self.agg.opts.rounds)

    def run(self, r: int, weights: dict) -> dict:
        """Have the online devices score ``weights`` (round ``r``'s aggregate)."""
        agg, number = self.agg, r + 1  # devices take tasks of rounds going forward only
        frame = agg.trust.frame(wire.Frame("model", agg.opts.job, number, SERVER, "fp32",
                                           weights))
        model_topic = agg.topics.model(number, "full")
        sent = agg.t.publish(model_topic, frame, retain=True)
        deadline = messages.task_deadline(agg.opts.round_timeout, time.time())
        tasks: dict[str, tuple[messages.Task, str]] = {}
        for d in agg._online():
            task = messages.Task(
                round=number, device=d.id, variant="full", model_sha256=wire.content_sha(frame),
                deadline=deadline, epochs=0, batch_size=agg.opts.batch_size, lr=0.0, seed=0,
                codec=agg.opts.codec, uplink="evaluate",
                nonce=agg.trust.nonce(number, f"{d.id}/eval"), session=agg.trust.session)
            tasks[d.id] = (task, d.profile)
            agg.trust.open_tasks[d.id] = (number, task.nonce)
            sent += agg.t.publish(agg.topics.task(number, d.id),
                                  agg.trust.seal(task, number, task.nonce, d.id))
        results: dict[str, dict] = {}
        held, agg.round = agg.round, None  # no training round is open meanwhile

        def handle(topic: str, where: dict, payload: bytes) -> None:
            if topic == RECONNECTED:
                agg._republish()
                agg.t.publish(model_topic, frame, retain=True)
            elif where["kind"] == "status":
                agg._on_status(where, payload)
            elif where["kind"] == "update":
                self._take(where, payload, number, tasks, results)
        try:
            while set(tasks) - set(results) and time.time() < deadline:
                if agg.watch is not None:
                    agg.watch()
                pump(agg.events, 0.05, agg.topics.parse, handle, agg._reject)
        finally:
            agg.round = held
            agg.trust.open_tasks.clear()
            agg.t.clear_retained(model_topic, chunks=len(frame) // agg.t.max_payload + 2)
        return summarize(r, tasks, results, sent)

    def _take(self, where: dict, payload: bytes, number: int, tasks: dict,
              results: dict) -> None:
        device = where["device"]
        if where["round"] != number or device not in tasks:
            raise WireError(f"round: {device!r} has no evaluate task in round "
                            f"{where['round']}")
        if device in results:
            return  # the same answer again (a re-sent task)
        task, profile = tasks[device]
        frame = self.agg.trust.update(payload, wire.Expect(
            kind="update", job=self.agg.opts.job, round=number,
            devices=frozenset([device]), codec="eval", tensors={}, nonce=task.nonce), device)
        results[device] = {"profile": profile, **_figures(frame.meta, self._samples(device)),
                           "bytes": len(payload)}

    def _samples(self, device: str) -> int:
        status = self.agg.devices.get(device)
        return status.samples if status is not None else 0


def _figures(meta: dict, registered: int) -> dict:
    """samples, loss, accuracy from an answer's meta, each checked (WireError names it)."""
    samples, loss, acc = meta.get("samples"), meta.get("loss"), meta.get("accuracy")
    if not isinstance(samples, int) or isinstance(samples, bool) or \
            not 0 <= samples <= registered:
        raise WireError(f"meta.samples: expected an int in 0..{registered} (the samples "
                        f"the device registered), got {samples!r}")
    for name, v, top in (("loss", loss, math.inf), ("accuracy", acc, 1.0)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or \
                not 0.0 <= v <= top or math.isnan(v):
            raise WireError(f"meta.{name}: expected a number in [0, {top:g}], got {v!r}")
    return {"samples": samples, "loss": float(loss), "accuracy": float(acc)}


def _weighted(rows: list[dict]) -> dict:
    n = sum(r["samples"] for r in rows)
    if n == 0:
        return {"devices": len(rows), "samples": 0, "accuracy": None, "loss": None}
    return {"devices": len(rows), "samples": n,
            "accuracy": round(sum(r["accuracy"] * r["samples"] for r in rows) / n, 4),
            "loss": round(sum(r["loss"] * r["samples"] for r in rows) / n, 4)}


def summarize(r: int, tasks: dict, results: dict, downlink: int) -> dict:
    """The record's ``device_eval``: weighted mean, per profile, spread over devices."""
    rows = [dict(results[d], device=d) for d in sorted(results)]
    scored = [x for x in rows if x["samples"] > 0]
    profiles = sorted({x["profile"] for x in rows})
    accs = [x["accuracy"] for x in scored]
    mean = sum(accs) / len(accs) if accs else 0.0
    spread = {"min": round(min(accs), 4), "max": round(max(accs), 4),
              "std": round(math.sqrt(sum((a - mean) ** 2 for a in accs) / len(accs)), 4)} \
        if accs else {}
    return {"model_round": r, "devices_assigned": len(tasks), "devices_reporting": len(rows),
            **{k: v for k, v in _weighted(scored).items() if k != "devices"},
            "by_profile": {p: _weighted([x for x in scored if x["profile"] == p])
                           for p in profiles},
            "spread": spread,
            "devices": {x["device"]: {k: x[k] for k in ("profile", "samples", "accuracy",
                                                        "loss")} for x in rows},
            "uplink_bytes": sum(x["bytes"] for x in rows), "downlink_bytes": downlink}
