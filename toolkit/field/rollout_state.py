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

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.errors import UsageError

FORMAT = "fedge-rollout/1"
FINAL = ("done", "rolled-back")


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
