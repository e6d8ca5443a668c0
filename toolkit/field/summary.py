"""The aggregator's round summary: one signed, retained message per closed round.

``fedge dashboard`` and other read-only watchers learn the job's progress from it
(docs/protocol.md, "Round summary"): the round record's figures, the cumulative
refusals by reason, the devices online, per-profile training loss, the aggregator's
CPU time and resident memory, and a compact history of the rounds before (so a
dashboard started mid-job draws the whole timeline). It is published from the
aggregator's ``on_round`` hook, on the loop's thread, after the round is checkpointed;
the broker_server package is not changed for it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from device_runtime import messages

log = logging.getLogger("fedge.server")

HISTORY = 500  # rounds kept in the summary's history (about 60 bytes each)
# Device ids listed as reporting: the message must stay under messages.MAX_MESSAGE
# (256 KiB) with 64-character ids; a larger fleet's rows get their "last seen" from
# the devices' statuses only.
REPORTING, REFUSED = 1500, 500
REASONS = 200  # the most frequent refusal reasons
# history row: the columns, in order (docs/protocol.md)
COLUMNS = ("round", "accuracy", "loss", "devices_reporting", "devices_assigned",
           "uplink_bytes", "downlink_bytes", "seconds", "rejected_total", "closed")


def _num(v) -> float:
    """A record figure for a typed float field: -1 for "not measured"."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else -1.0


def history_row(rec: dict, closed: float) -> list:
    """One round of the summary's history (``COLUMNS``)."""
    return [rec["round"], _num(rec.get("accuracy")), _num(rec.get("loss")),
            rec["devices_reporting"], rec["devices_assigned"], rec["uplink_bytes"],
            rec["downlink_bytes"], rec["seconds"], rec.get("rejected_so_far", 0),
            round(closed, 3)]


def profile_figures(rec: dict, profile_of: Callable[[str], str]) -> dict:
    """profile -> {"devices": reporting, "loss": mean training loss, "accuracy": the
    round record's per-profile evaluation where it has one}."""
    out: dict[str, dict] = {}
    for device in rec.get("accepted", []):
        p = out.setdefault(profile_of(device) or "?", {"devices": 0, "losses": []})
        p["devices"] += 1
        loss = rec.get("device_loss", {}).get(device)
        if loss is not None:
            p["losses"].append(loss)
    evaluated = (rec.get("eval") or {}).get("profiles") or {}
    for name, p in out.items():
        losses = p.pop("losses")
        p["loss"] = round(sum(losses) / len(losses), 6) if losses else -1.0
        acc = (evaluated.get(name) or {}).get("accuracy")
        p["accuracy"] = _num(acc)
    return out


def cpu_seconds() -> float:
    t = os.times()
    return round(t.user + t.system, 3)


def build(agg, rec: dict, history: list) -> messages.Summary:
    """The summary of round record ``rec`` of Aggregator ``agg``."""
    from broker_server.records import rss_bytes

    devices = agg.devices
    online = sum(1 for s in devices.values() if s.state == "online")
    return messages.Summary(
        round=rec["round"], rounds=agg.opts.rounds, closed=time.time(),
        seconds=float(rec["seconds"]), devices_assigned=rec["devices_assigned"],
        devices_reporting=rec["devices_reporting"], devices_online=online,
        uplink_bytes=rec["uplink_bytes"], downlink_bytes=rec["downlink_bytes"],
        accuracy=_num(rec.get("accuracy")), loss=_num(rec.get("loss")),
        reporting=list(rec.get("accepted", []))[:REPORTING],
        refused=list(rec.get("refused", []))[:REFUSED],
        rejected_by_reason=dict(sorted(agg.rejected.by_reason.items(),
                                       key=lambda kv: -kv[1])[:REASONS]),
        profiles=profile_figures(rec, lambda d: devices[d].profile if d in devices else ""),
        cpu_seconds=cpu_seconds(), rss_bytes=int(rec.get("rss_bytes") or rss_bytes()),
        history=history[-HISTORY:], session=agg.trust.session)


def publish_summaries(agg, then: Callable[[dict], None] | None) -> None:
    """Make ``agg`` publish a summary after each round, then call ``then(record)``.
    The history starts with the rounds a restarted aggregator already has."""
    history = [history_row(r, 0.0) for r in agg.state.history]

    def on_round(rec: dict) -> None:
        summary = build(agg, rec, history)
        history.append(history_row(rec, summary.closed))
        try:
            agg.t.publish(agg.topics.summary, agg.trust.seal(summary, rec["round"],
                                                             agg.trust.session), retain=True)
        except Exception as e:  # a watcher's message must never stop the job
            log.warning("round %d: summary not published: %s", rec["round"], e)
        if then:
            then(rec)
    agg.on_round = on_round
