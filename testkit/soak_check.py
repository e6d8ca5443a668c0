"""The soak's evidence: an independent observer on the broker and the exactly-once checks.

``Observer`` is one more MQTT client (fedge's own transport, so chunked frames are
reassembled) that records every update payload, every round's model frame and
every task's seed as they cross the broker. ``check_round`` then proves, for one
round record of the aggregator:

(a) the devices of ``updates`` are distinct and ``folded == len(updates)``, and
    ``accepted`` names the same devices;
(b) every accepted sha256 is the sha256 of a payload the observer saw that device
    send for that round;
(c) folding exactly those payloads, in the recorded order, into the round's model
    frame with the job's own fold (``broker_server.strategies``) reproduces the
    next round's model frame bit for bit.

A duplicate folded twice, a resent update folded again after a restart, or a
payload folded that no device sent breaks (a), (b) or (c). Per round the checker
also folds the first update twice and makes sure that result differs from the
true one: the recomputation is shown to notice a double fold on that round's data.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np

from broker_server.records import digest
from broker_server.strategies import create
from device_runtime import codecs, messages, wire
from device_runtime.backoff import Backoff
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError
from device_runtime.topics import Topics
from toolkit import strategies


def _body_matches(payload: bytes) -> bool:
    try:
        wire.verify(payload, None)
    except WireError:
        return False
    return True


@dataclass
class Seen:
    """What crossed the broker, as the observer received it."""

    updates: dict[tuple[int, str], dict[str, bytes]] = field(default_factory=dict)
    sends: dict[tuple[int, str], int] = field(default_factory=dict)  # publications per key
    models: dict[int, dict[str, bytes]] = field(default_factory=dict)  # round -> sha -> frame
    seeds: dict[int, set[int]] = field(default_factory=dict)  # round -> task seeds
    first_seen: dict[int, float] = field(default_factory=dict)  # round -> model first seen

    def add_update(self, r: int, device: str, payload: bytes) -> None:
        if _body_matches(payload):  # the digest names the head, which names the body
            self.updates.setdefault((r, device), {})[digest(payload)] = payload
        self.sends[(r, device)] = self.sends.get((r, device), 0) + 1

    def add_model(self, r: int, frame: bytes, now: float) -> None:
        self.models.setdefault(r, {})[digest(frame)] = frame
        self.first_seen.setdefault(r, now)

    def resends(self, r: int) -> int:
        """Update publications of round r beyond the first per device."""
        return sum(n - 1 for (rr, _), n in self.sends.items() if rr == r)


class Observer:
    """Subscribes to the job's updates, models and tasks; reconnects fast after a broker
    restart (before the devices' backoff), so that it misses as little as possible."""

    def __init__(self, url: str, job: str, server_key, clock=None):
        import time

        from device_runtime.transport.mqtt import MqttTransport

        self.topics, self.seen, self.lock = Topics(job), Seen(), threading.Lock()
        self.job, self.server_key = job, server_key  # tasks are signed: checked as devices do
        self.clock = clock or time.time
        self.t = MqttTransport(url, f"soak-observer-{job}", backoff=Backoff(0.02, 0.2))
        self.errors: list[str] = []
        self.t.on_error = lambda topic, why: self.errors.append(f"{topic}: {why}")

    def start(self) -> None:
        self.t.connect()
        self.t.subscribe(self.topics.update(), self._on)
        self.t.subscribe(self.topics.model("+", "full"), self._on)
        self.t.subscribe(self.topics.task("+", "+"), self._on)

    def close(self) -> None:
        self.t.close()

    def current_round(self) -> int:
        with self.lock:
            return max(self.seen.models, default=0)

    def _on(self, topic: str, payload: bytes) -> None:
        where = self.topics.parse(topic)
        with self.lock:
            if where["kind"] == "update":
                self.seen.add_update(where["round"], where["device"], payload)
            elif where["kind"] == "model":
                self.seen.add_model(where["round"], payload, self.clock())
            elif where["kind"] == "task":
                try:
                    seed = messages.unseal(messages.Task, payload, self.server_key,
                                           self.job).msg.seed
                except (messages.MessageError, WireError) as e:
                    self.errors.append(f"{topic}: {e}")
                    return
                self.seen.seeds.setdefault(where["round"], set()).add(seed)


def _fold(strategy: str, codec: str, r: int, ref: dict, seed: int,
          payloads: list[tuple[str, bytes]]) -> dict:
    """The job's own fold of these payloads, in this order, over the reference model."""
    strategies.get(strategy)  # the aggregator knows it by the name its spec registers
    s = create(strategy)
    c = codecs.get(codec)
    fold = s.fold(r, ref, c, CodecContext(round=r, seed=seed, reference=ref))
    for device, payload in payloads:
        f = wire.decode(payload)
        fold.add(device, int(f.meta["samples"]), f.tensors, f.params,
                 variant=f.meta.get("variant", "full"))
    return fold.result()


def same_tensors(a: dict, b: dict) -> bool:
    """Bit for bit: names, dtypes, shapes and bytes."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and
        np.ascontiguousarray(a[k]).tobytes() == np.ascontiguousarray(b[k]).tobytes()
        for k in a)


def check_round(rec: dict, seen: Seen, next_model: bytes | None, strategy: str,
                codec: str) -> dict:
    """Checks (a), (b), (c) for one round record; ``failures`` lists what failed."""
    r, fails = rec["round"], []
    pairs = [tuple(p) for p in rec.get("updates", [])]
    devices = [d for d, _ in pairs]
    out = {"round": r, "updates": len(pairs), "distinct": len(set(devices)) == len(devices)}
    if not out["distinct"]:
        fails.append(f"round {r}: a device is listed twice in updates: {sorted(devices)}")
    if rec.get("folded") != len(pairs):
        fails.append(f"round {r}: folded {rec.get('folded')} != {len(pairs)} updates")
    if sorted(set(devices)) != sorted(rec.get("accepted", [])):
        fails.append(f"round {r}: updates {sorted(devices)} != accepted {rec.get('accepted')}")
    if not pairs:
        fails.append(f"round {r}: no update folded")
    missing = [(d, s[:12]) for d, s in pairs if s not in seen.updates.get((r, d), {})]
    out["observed"] = not missing
    if missing:
        fails.append(f"round {r}: accepted payloads nobody was seen sending: {missing}")
    models, seeds = seen.models.get(r, {}), seen.seeds.get(r, set())
    if len(models) != 1:
        fails.append(f"round {r}: {len(models)} distinct model frames observed (want 1)")
    if len(seeds) != 1:
        fails.append(f"round {r}: task seeds observed {sorted(seeds)} (want one)")
    if next_model is None:
        fails.append(f"round {r}: no next model frame to compare with")
    out["recomputed"] = out["double_fold_detectable"] = False
    if pairs and not missing and len(models) == 1 and len(seeds) == 1 and next_model:
        ref = wire.decode(next(iter(models.values()))).tensors
        payloads = [(d, seen.updates[(r, d)][s]) for d, s in pairs]
        seed, want = next(iter(seeds)), wire.decode(next_model).tensors
        out["recomputed"] = same_tensors(_fold(strategy, codec, r, ref, seed, payloads), want)
        if not out["recomputed"]:
            fails.append(f"round {r}: folding the accepted payloads does not reproduce the "
                         "next model bit for bit")
        doubled = _fold(strategy, codec, r, ref, seed, [payloads[0], *payloads])
        out["double_fold_detectable"] = not same_tensors(doubled, want)
    out["failures"] = fails
    return out


def check_history(history: list[dict], seen: Seen, final_model: bytes | None, rounds: int,
                  strategy: str, codec: str) -> dict:
    """Every round 1..rounds once, in order, and ``check_round`` on each; the model after
    the last round is ``final_model`` (the aggregator's saved global)."""
    fails = []
    numbers = [h["round"] for h in history]
    if numbers != list(range(1, rounds + 1)):
        fails.append(f"rounds in the history: {numbers} (want 1..{rounds} once each)")
    per_round = []
    for h in history:
        nxt = final_model if h["round"] == rounds else \
            next(iter(seen.models.get(h["round"] + 1, {}).values()), None)
        res = check_round(h, seen, nxt, strategy, codec)
        fails += res.pop("failures")
        per_round.append(res)
    ok = [p for p in per_round if p["distinct"] and p["observed"] and p["recomputed"]]
    return {"rounds_checked": len(per_round), "rounds_passed": len(ok),
            "updates_checked": sum(p["updates"] for p in per_round),
            "double_fold_detectable": sum(p["double_fold_detectable"] for p in per_round),
            "failures": fails, "passed": not fails, "per_round": per_round}


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Theil-Sen slope of ys over xs: the median of the slopes between every two points,
    a line fit that a few one-round RSS jumps cannot tilt (a least-squares fit over 10
    rounds moved by +-1 MiB/round on them). None with fewer than 3 points."""
    if len(xs) < 3:
        return None
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    i, j = np.triu_indices(len(x), 1)
    keep = x[j] != x[i]
    return float(np.median((y[j] - y[i])[keep] / (x[j] - x[i])[keep]))
