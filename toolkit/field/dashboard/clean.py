"""The fields the dashboard shows, taken from verified messages and checked once more.

A signature says who sent a message, not that its free-form parts (a status's
``versions``, a summary's history and profiles) are what the page expects: each is
checked here for type, range and size, and a message with a field that is not is
refused whole (``Invalid``, naming the field, what was expected and what came).
Strings are cut to a length; the page writes them as text, never as HTML.
"""
from __future__ import annotations

import math

from device_runtime import messages
from toolkit.field.summary import COLUMNS, HISTORY

TEXT = 200  # longest string kept of a name or version
ERROR = 500  # longest error text kept
MAX_PROFILES = 64
MAX_REASONS = 200
MAX_DEVICES = 100_000
STATES = ("online", "offline", "error")


class Invalid(ValueError):
    """A verified message whose content is not what the dashboard shows."""


def _text(v, limit: int = TEXT) -> str:
    return str(v)[:limit]


def _number(where: str, v, lo: float = -math.inf) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
            or v < lo:
        raise Invalid(f"{where}: expected a finite number >= {lo:g}, got {str(v)[:40]!r}")
    return v


def _count(where: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise Invalid(f"{where}: expected an integer >= 0, got {str(v)[:40]!r}")
    return v


def status(s: messages.Status) -> dict:
    """A status as a table row's fields (the device's own word on its versions)."""
    if s.state not in STATES:
        raise Invalid(f"status.state: expected one of {', '.join(STATES)}, got "
                      f"{s.state[:40]!r}")
    v = s.versions
    return {"state": s.state, "profile": _text(s.profile), "samples": _count(
        "status.samples", s.samples), "fedge": _text(v.get("fedge", "")),
            "artifact": _text(v.get("manifest_version", "")),
            "provider": _text(v.get("ort_provider", "")),
            "onnxruntime": _text(v.get("onnxruntime", "")),
            "error": _text(s.error, ERROR), "round": 0}


def history(rows: list) -> list[list]:
    if len(rows) > HISTORY:
        raise Invalid(f"summary.history: expected at most {HISTORY} rounds, got {len(rows)}")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(COLUMNS):
            raise Invalid(f"summary.history[{i}]: expected a list of {len(COLUMNS)} numbers")
        nums = [_number(f"summary.history[{i}].{c}", x) for c, x in zip(COLUMNS, row)]
        nums[0] = _count(f"summary.history[{i}].round", row[0])
        out.append(nums)
    return out


def profiles(p: dict) -> dict:
    if len(p) > MAX_PROFILES:
        raise Invalid(f"summary.profiles: expected at most {MAX_PROFILES}, got {len(p)}")
    out = {}
    for name, figs in p.items():
        if not isinstance(figs, dict):
            raise Invalid(f"summary.profiles.{name[:40]}: expected an object")
        out[_text(name, 64)] = {
            "devices": _count(f"summary.profiles.{name[:40]}.devices", figs.get("devices", 0)),
            "loss": _number(f"summary.profiles.{name[:40]}.loss", figs.get("loss", -1.0)),
            "accuracy": _number(f"summary.profiles.{name[:40]}.accuracy",
                                figs.get("accuracy", -1.0))}
    return out


def reasons(r: dict) -> dict[str, int]:
    if len(r) > MAX_REASONS:
        raise Invalid(f"summary.rejected_by_reason: expected at most {MAX_REASONS} reasons, "
                      f"got {len(r)}")
    return {_text(k): _count(f"summary.rejected_by_reason[{k[:40]!r}]", v)
            for k, v in r.items()}


def ids(where: str, xs: list) -> list[str]:
    if len(xs) > MAX_DEVICES or not all(isinstance(x, str) for x in xs):
        raise Invalid(f"{where}: expected at most {MAX_DEVICES} device ids")
    return [_text(x, 64) for x in xs]


def summary(s: messages.Summary) -> dict:
    """A summary's figures, checked; ``row`` is its own round as a history row."""
    for name in ("round", "rounds", "devices_assigned", "devices_reporting",
                 "devices_online", "uplink_bytes", "downlink_bytes", "rss_bytes"):
        _count(f"summary.{name}", getattr(s, name))
    for name in ("seconds", "cpu_seconds", "closed"):
        _number(f"summary.{name}", getattr(s, name), 0.0)
    rejected = reasons(s.rejected_by_reason)
    out = {"round": s.round, "rounds": s.rounds, "closed": s.closed, "seconds": s.seconds,
           "devices_assigned": s.devices_assigned, "devices_reporting": s.devices_reporting,
           "devices_online": s.devices_online, "uplink_bytes": s.uplink_bytes,
           "downlink_bytes": s.downlink_bytes, "accuracy": s.accuracy, "loss": s.loss,
           "reporting": ids("summary.reporting", s.reporting),
           "refused": ids("summary.refused", s.refused),
           "rejected_by_reason": rejected, "rejected_total": sum(rejected.values()),
           "profiles": profiles(s.profiles), "cpu_seconds": s.cpu_seconds,
           "rss_bytes": s.rss_bytes, "history": history(s.history)}
    out["row"] = [s.round, s.accuracy, s.loss, s.devices_reporting, s.devices_assigned,
                  s.uplink_bytes, s.downlink_bytes, s.seconds, out["rejected_total"],
                  s.closed]
    return out


def plan(p: messages.Plan) -> dict:
    return {"strategy": _text(p.strategy), "codec": _text(p.codec), "rounds": p.rounds,
            "min_devices": p.min_devices, "issued": p.issued}


STAGES = ("canary", "all", "done", "rolling-back", "rolled-back")
ACTIONS = ("install", "rollback")


def _optional(where: str, v):
    return None if v is None else _number(where, v, 0.0)


def _report(d: str, r) -> dict:
    where = f"rollout.devices[{d[:40]!r}]"
    if not isinstance(r, dict):
        raise Invalid(f"{where}: expected an object, got {type(r).__name__}")
    if r.get("action") not in ACTIONS or not isinstance(r.get("ok"), bool):
        raise Invalid(f"{where}: expected action in {', '.join(ACTIONS)} and a boolean ok, "
                      f"got {str(r.get('action'))[:40]!r}, {str(r.get('ok'))[:10]!r}")
    v = r.get("artifact_version")
    return {"action": r["action"], "ok": r["ok"],
            "artifact_version": None if v is None else _count(f"{where}.artifact_version", v),
            "latency_ms": _optional(f"{where}.latency_ms", r.get("latency_ms")),
            "previous_latency_ms": _optional(f"{where}.previous_latency_ms",
                                             r.get("previous_latency_ms")),
            "error": _text(r.get("error") or "", ERROR)}


def rollout(r: messages.RolloutReport) -> dict:
    """A rollout report's figures, checked (the page draws the rollout panel from it)."""
    if r.stage not in STAGES:
        raise Invalid(f"rollout.stage: expected one of {', '.join(STAGES)}, got "
                      f"{r.stage[:40]!r}")
    _count("rollout.version", r.version)
    for name in ("hold_from", "hold", "updated"):
        _number(f"rollout.{name}", getattr(r, name), 0.0)
    if len(r.devices) > MAX_DEVICES or len(r.previous) > MAX_DEVICES:
        raise Invalid(f"rollout.devices: expected at most {MAX_DEVICES}")
    history = []
    for i, h in enumerate(r.history[-50:]):
        if not (isinstance(h, list) and len(h) == 3 and h[1] in STAGES):
            raise Invalid(f"rollout.history[{i}]: expected [time, stage, note]")
        history.append([_number(f"rollout.history[{i}].time", h[0], 0.0), h[1],
                        _text(h[2], ERROR)])
    return {"rollout": _text(r.rollout, 64), "version": r.version, "stage": r.stage,
            "reason": _text(r.reason, ERROR), "canary": ids("rollout.canary", r.canary),
            "rest": ids("rollout.rest", r.rest),
            "previous": {_text(d, 64): _count(f"rollout.previous[{d[:40]!r}]", v)
                         for d, v in r.previous.items()},
            "devices": {_text(d, 64): _report(d, x) for d, x in r.devices.items()},
            "omitted": _count("rollout.omitted", r.omitted), "hold_from": r.hold_from,
            "hold": r.hold, "history": history, "updated": r.updated}
