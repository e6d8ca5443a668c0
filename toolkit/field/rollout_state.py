"""``fedge rollout``'s state file: where a staged rollout is, so that a restarted
``fedge rollout`` resumes it (same commands, same ``issued`` times: devices that
already acted answer again without acting twice) and ``fedge rollout --status``
can say where it is.

One JSON document per job, written atomically (temporary file, fsync, rename)::

    {"format": "fedge-rollout/1", "job": ..., "rollout": "<id>", "version": 2,
     "manifest": "/path/manifest.json", "manifest_sha256": ..., "stage": "canary",
     "canary": ["dev-3", "dev-6"], "rest": [...], "from": {"dev-3": 1, ...},
     "issued": {"canary": 1765..., "all": ..., "rollback": ...},
     "hold_from": 1765..., "devices": {"dev-3": {"action": "install", "ok": true,
     "artifact_version": 2, "since": <first report of this result>, "time": ..., ...}},
     "history": [[time, stage, note], ...]}

Stages: ``canary`` -> ``all`` -> ``done``, or ``canary`` -> ``rolling-back`` ->
``rolled-back`` (with the reason).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.errors import UsageError

FORMAT = "fedge-rollout/1"
FINAL = ("done", "rolled-back")
# A device's report as the RolloutReport carries it (docs/protocol.md).
REPORTED = ("action", "ok", "artifact_version", "latency_ms", "previous_latency_ms", "error")


@dataclass
class RolloutState:
    job: str
    rollout: str
    version: int
    manifest: str
    manifest_sha256: str
    stage: str = "canary"
    canary: list[str] = field(default_factory=list)
    rest: list[str] = field(default_factory=list)
    previous: dict[str, int] = field(default_factory=dict)  # device -> version before
    issued: dict[str, float] = field(default_factory=dict)  # stage -> command time
    hold_from: float = 0.0  # when the canary had reported: the hold runs from here
    devices: dict[str, dict] = field(default_factory=dict)  # device -> its last report
    reason: str = ""
    history: list[list] = field(default_factory=list)

    def enter(self, stage: str, note: str = "") -> None:
        self.stage = stage
        self.history.append([round(time.time(), 3), stage, note])

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"format": FORMAT, **asdict(self)}, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> "RolloutState | None":
        """The state in ``path`` (None if there is none); damage is a one-line error."""
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise UsageError(f"--state {path}: not a readable rollout state ({e})") from None
        if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT:
            raise UsageError(f"--state {path}: expected format {FORMAT!r}")
        try:
            return cls(**doc)
        except TypeError as e:
            raise UsageError(f"--state {path}: {e}") from None


def report(st: RolloutState, hold: float):
    """The state as the signed ``RolloutReport`` watchers read (``rollouts``). Past
    ``MAX_MESSAGE`` (fleets of thousands) the healthy devices' reports are left out,
    counted in ``omitted``: the failures are what an operator has to see."""
    from device_runtime import messages

    devices = {d: {k: r.get(k) for k in REPORTED} for d, r in st.devices.items()}
    for d in devices:
        devices[d]["error"] = str(devices[d]["error"] or "")[:200]
    msg = messages.RolloutReport(
        rollout=st.rollout, version=st.version, stage=st.stage, reason=st.reason[:400],
        canary=st.canary, rest=st.rest, previous=st.previous, devices=devices,
        hold_from=st.hold_from, hold=hold, history=st.history[-50:], updated=time.time())
    if len(messages.dump(msg)) > messages.MAX_MESSAGE // 2:
        bad = {d: r for d, r in devices.items() if not r["ok"]}
        bad = dict(sorted(bad.items())[:500])
        msg = dataclasses.replace(msg, devices=bad, omitted=len(devices) - len(bad))
    return msg


def default_path(job: str) -> Path:
    from device_runtime.rollback import fedge_home

    return fedge_home() / "rollouts" / f"{job}.json"


def describe(st: RolloutState) -> str:
    """``fedge rollout --status``: the stage and a line per device."""
    lines = [f"rollout {st.rollout} of job {st.job}: version {st.version}, stage {st.stage}"
             + (f" ({st.reason})" if st.reason else "")]
    for name, group in (("canary", st.canary), ("rest", st.rest)):
        for d in group:
            rep = st.devices.get(d, {})
            state = "waiting" if not rep else ("ok" if rep.get("ok") else "error")
            lines.append(f"  {name:6s} {d:16s} v{st.previous.get(d, '?')} -> "
                         f"v{rep.get('artifact_version', '?')}  {state}  "
                         f"{rep.get('latency_ms', '')} ms  {rep.get('error', '')}".rstrip())
    for t, stage, note in st.history:
        lines.append(f"  {time.strftime('%H:%M:%S', time.gmtime(t))} {stage} {note}".rstrip())
    return "\n".join(lines)
