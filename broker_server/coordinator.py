"""The aggregator's side of scale-out: instead of folding updates itself, it tells its
workers (``workers.py``) which round is open, counts their ``accepted`` reports, and
at the close merges their partial sums into the round's fold.

``ScaleOut`` is a set of hooks the aggregator's loop calls on its own thread
(``Aggregator(..., scale_out=...)``): ``subscribe`` instead of the update topic,
``wait_ready`` before the first round, ``announce`` after every assignment,
``handle`` for worker messages, ``gather`` before the round closes, ``republish``
after a reconnect. Deadlines and quorum stay in the aggregator: a device counts as
reported when its first ``accepted`` report arrives.

Exactly once: QoS 1 redeliveries and device resends can reach two workers. The
first report of a device wins; the "close" message lists, per worker, the devices
its partial must hold, and a worker that holds others rebuilds its partial
without them. Partials are merged in worker-id order, so the coordinator's sums
do not depend on arrival order.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from broker_server.downlink import recount_fetch
from broker_server.errors import BrokerServerError
from broker_server.scaleout import WorkRound, parse_accepted, parse_refused, parse_status
from broker_server.trust import ServerTrust
from device_runtime import wire
from device_runtime.errors import WireError
from device_runtime.topics import Topics

log = logging.getLogger("fedge.server")


@dataclass(frozen=True)
class ScaleOutOptions:
    workers: int  # online before the first round (the group may grow later)
    strategy: str
    codec: str
    fold_options: dict = field(default_factory=dict)  # from scaleout.check_split
    ready_timeout: float = 60.0  # for the workers to come online
    partial_timeout: float = 60.0  # for their partials at each close


class ScaleOut:
    def __init__(self, transport, job: str, opts: ScaleOutOptions, trust: ServerTrust,
                 alive: Callable[[], None] | None = None):
        if opts.workers < 1:
            raise BrokerServerError(f"workers: expected >= 1, got {opts.workers}")
        self.t, self.job, self.opts = transport, job, opts
        self.trust = trust  # workers sign with the aggregator's key; so does the round message
        self.key = trust.signer.public
        self.topics = Topics(job)
        self.session = uuid.uuid4().hex[:16]
        # Raises if a worker process we started has exited (fedge serve --workers): before
        # the first round that is a setup error, not something to wait out.
        self.alive = alive
        self.online: set[str] = set()
        self.round = 0
        self.reporter: dict[str, tuple[str, str]] = {}  # device -> (worker, sha256), first
        self.closing: dict[str, list[str]] | None = None  # worker -> devices, at close
        self.partials: dict[str, wire.Frame] = {}
        self.counts: dict[str, int] = defaultdict(int)  # worker -> updates merged, all rounds
        self.rounds: list[dict] = []  # per round: worker -> updates merged
        self.work: WorkRound | None = None

    # --- hooks ------------------------------------------------------------------
    def subscribe(self, enqueue) -> None:
        self.t.clear_retained(self.topics.work)  # an earlier run's round
        self.t.subscribe(self.topics.worker(), enqueue)

    def wait_ready(self, agg) -> None:
        deadline = time.time() + self.opts.ready_timeout
        while len(self.online) < self.opts.workers:
            if self.alive is not None:
                self.alive()
            if time.time() > deadline:
                raise BrokerServerError(
                    f"only {len(self.online)} of {self.opts.workers} workers came online "
                    f"within {self.opts.ready_timeout:g}s")
            agg._pump(0.2)

    def announce(self, agg, rs) -> None:
        if rs.number != self.round:
            self.round, self.reporter = rs.number, {}
        devices = {d: {"variant": t.variant,
                       "samples": agg.devices[d].samples if d in agg.devices else 0,
                       "nonce": t.nonce}
                   for d, t in rs.assigned.items()}
        self._publish(WorkRound(rs.number, self.session, "open", self.opts.strategy,
                                self.opts.codec, agg._task_seed(rs.number), dict(rs.model_sha),
                                devices, dict(self.opts.fold_options),
                                guard=_guard(agg.guard, rs.assigned)))

    def handle(self, agg, where: dict, payload: bytes) -> None:
        worker, what = where["worker"], where["what"]
        if what == "status":
            s = parse_status(payload, worker, self.key, self.job)
            (self.online.add if s.state == "online" else self.online.discard)(worker)
        elif what == "accepted":
            self._on_accepted(agg, worker, payload)
        elif what == "refused":
            self._on_refused(agg, worker, payload)
        elif what == "partial":
            self._on_partial(agg, worker, payload)

    def gather(self, agg, rs) -> None:
        """Ask each worker for the partial of the devices it reported first; merge them."""
        include: dict[str, list[str]] = {}
        for device, (worker, _) in sorted(self.reporter.items()):
            if device in rs.accepted:
                include.setdefault(worker, []).append(device)
        self.closing, self.partials = include, {}
        self._publish(dataclasses.replace(self.work, state="close", close=include))
        deadline = time.time() + self.opts.partial_timeout
        while set(self.partials) != set(include) and time.time() < deadline:
            agg._pump(0.05)
        merged = {}
        for worker in sorted(include):  # a fixed order: the same sums every time
            merged[worker] = self._merge(agg, rs, worker, include[worker])
            # The round record's evidence, as if the aggregator had folded them itself.
            rs.folded += [(d, self.reporter[d][1]) for d in merged[worker]]
        self.closing = None
        for device in set(rs.accepted) - {d for ds in merged.values() for d in ds}:
            del rs.accepted[device]  # its worker did not deliver it: not in this round
        if not rs.accepted:
            raise BrokerServerError(f"round {rs.number}: no worker delivered a partial "
                                    f"within {self.opts.partial_timeout:g}s")
        self.rounds.append({"round": rs.number,
                            "workers": {w: len(ds) for w, ds in merged.items()}})
        for w, ds in merged.items():
            self.counts[w] += len(ds)

    def republish(self) -> None:
        """After a reconnect: a broker without persistence lost the retained round."""
        if self.work is not None:
            self.t.publish(self.topics.work, self.trust.seal(self.work), retain=True)

    def finish(self) -> None:
        """The job is over: workers that served it stop."""
        if self.work is not None:
            self._publish(dataclasses.replace(self.work, state="done", close={}))

    def report(self) -> dict:
        return {"workers": self.opts.workers, "updates_by_worker": dict(self.counts),
                "rounds": self.rounds}

    # --- messages ---------------------------------------------------------------
    def _publish(self, w: WorkRound) -> None:
        self.work = w
        self.t.publish(self.topics.work, self.trust.seal(w), retain=True)

    def _on_accepted(self, agg, worker: str, payload: bytes) -> None:
        a = parse_accepted(payload, worker, self.key, self.job)
        rs = agg.round
        if rs is None or a.round != rs.number or self.closing is not None:
            log.info("report of %s's update in round %d from worker %s after the close: "
                     "ignored", a.device, a.round, worker)
            return
        if a.device not in rs.assigned:
            raise WireError(f"accepted.device: {a.device!r} has no task in round {a.round}")
        first = self.reporter.get(a.device)
        if first is not None:
            if first != (worker, a.sha256):  # a second copy, on another worker
                agg.duplicates += 1
                log.info("update from %s in round %d reached workers %s and %s: folded "
                         "once", a.device, a.round, first[0], worker)
            return
        self.reporter[a.device] = (worker, a.sha256)
        agg.guard.accept(a.device, a.norm or None, rs)  # next round's reference norms
        rs.accepted[a.device] = dict(a.meta)
        rs.uplink_bytes += a.nbytes
        recount_fetch(rs, a.device, a.meta, rs.assigned[a.device].variant)

    def _on_refused(self, agg, worker: str, payload: bytes) -> None:
        """A worker's guard refused an update: counted as the aggregator counts its own
        refusals, and the round does not wait for the device (unless it sends again)."""
        r = parse_refused(payload, worker, self.key, self.job)
        rs = agg.round
        if rs is None or r.round != rs.number or r.device not in rs.assigned or \
                r.device in self.reporter:
            return
        rs.refused.add(r.device)
        agg._reject({"kind": "update", "device": r.device, "round": r.round},
                    f"{r.reason} (worker {worker})")

    def _on_partial(self, agg, worker: str, payload: bytes) -> None:
        if self.closing is None or worker not in self.closing:
            log.info("partial from worker %s not asked for: ignored", worker)
            return
        rs = agg.round
        frame = wire.decode(payload, wire.Expect(kind="partial", job=self.job,
                                                 round=rs.number, devices=frozenset([worker]),
                                                 codec=self.opts.codec), key=self.key)
        devices, model = frame.meta.get("devices"), frame.meta.get("model")
        want = set(self.closing[worker])
        if not isinstance(devices, list) or len(set(devices)) != len(devices) or \
                not set(devices) <= want:
            raise WireError(f"partial meta.devices: expected distinct ids among "
                            f"{sorted(want)}, got {devices!r}")
        if model != rs.model_sha.get("full"):
            raise WireError(f"partial meta.model: expected {rs.model_sha.get('full')!r} "
                            f"(the round's model), got {model!r}")
        self.partials[worker] = frame

    def _merge(self, agg, rs, worker: str, devices: list[str]) -> list[str]:
        """The devices merged from ``worker``'s partial ([] if none came or it is bad)."""
        frame = self.partials.get(worker)
        if frame is None:
            log.warning("round %d: no partial from worker %s: its %d updates are dropped",
                        rs.number, worker, len(devices))
            return []
        try:
            rs.fold.merge_partial(frame.tensors, frame.meta)
        except WireError as e:
            agg._reject({"kind": "partial", "device": worker, "round": rs.number}, str(e))
            return []
        return list(frame.meta["devices"])


def _guard(guard, assigned) -> dict:
    """What a worker needs of the aggregator's guard to bound the round's updates."""
    return {"factor": guard.factor if math.isfinite(guard.factor) else None,
            "max_samples": guard.max_samples, "previous": list(guard.previous),
            "registered": {d: n for d, n in guard.registered.items() if d in assigned}}


__all__ = ["ScaleOut", "ScaleOutOptions"]
