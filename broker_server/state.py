"""The aggregator's durable state: what survives a SIGKILL.

Layout of ``--state-dir``::

    state.json          completed rounds, history, the current global file name
    global-<r>.fdg      the global weights after round r (a wire frame, no pickle)
    kept-<name>.fdg     tensors the strategy keeps across rounds (``Strategy.kept``),
                        rewritten only when they change; state.json lists the live ones
    round-<r>/<id>.fdg  every update accepted in the open round r, as received

Every file is written atomically (temp file, fsync, rename, fsync of the
folder), and ``state.json`` is written last, so after a crash the state is
either the previous round's or the new one's, never a mix; accepted updates
of the open round are reloaded, so none is lost.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime import wire
from device_runtime.errors import WireError
from broker_server.errors import BrokerServerError


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class ServerState:
    job: str
    completed: int = 0  # rounds aggregated so far
    global_file: str = ""
    history: list[dict] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # strategy state (JSON)
    kept: dict = field(default_factory=dict)  # name -> sha256 of its kept-<name>.fdg


class StateStore:
    def __init__(self, root: str | Path, job: str):
        self.root = Path(root)
        self.job = job
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def load(self) -> tuple[ServerState, dict | None]:
        """The saved state and global weights, or a fresh state and None."""
        if not self.state_path.exists():
            return ServerState(self.job), None
        try:
            d = json.loads(self.state_path.read_text())
            st = ServerState(d["job"], d["completed"], d["global_file"], d["history"],
                             d.get("extra", {}), d.get("kept", {}))
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise BrokerServerError(f"state {self.state_path} is unreadable: {e}") from None
        if st.job != self.job:
            raise BrokerServerError(f"state dir {self.root} belongs to job {st.job!r}, "
                                    f"not {self.job!r}")
        try:
            frame = wire.decode((self.root / st.global_file).read_bytes())
        except (OSError, WireError) as e:
            raise BrokerServerError(f"global model {st.global_file} is unreadable: {e}") from None
        return st, frame.tensors

    def save_round(self, st: ServerState, weights: dict,
                   kept: dict[str, tuple[str, dict, dict]] | None = None) -> None:
        """Persist the global model after round ``st.completed`` and the strategy's kept
        tensors, then the state."""
        kept_now = {}
        for key, (codec, tensors, params) in (kept or {}).items():
            data = wire.encode(wire.Frame("kept", self.job, st.completed, "server", codec,
                                          tensors, params))
            digest = hashlib.sha256(data).hexdigest()
            if st.kept.get(key) != digest or not self._kept_path(key).exists():
                atomic_write(self._kept_path(key), data)
            kept_now[key] = digest
        stale = set(st.kept) - set(kept_now)
        st.kept = kept_now
        name = f"global-{st.completed}.fdg"
        frame = wire.Frame("model", self.job, st.completed, "server", "fp32", weights)
        atomic_write(self.root / name, wire.encode(frame))
        old = st.global_file
        st.global_file = name
        atomic_write(self.state_path, json.dumps(
            {"job": st.job, "completed": st.completed, "global_file": st.global_file,
             "history": st.history, "extra": st.extra, "kept": st.kept}, indent=1).encode())
        for key in stale:
            self._kept_path(key).unlink(missing_ok=True)
        if old and old != name:
            (self.root / old).unlink(missing_ok=True)
        for d in self.root.glob("round-*"):
            if d.is_dir() and int(d.name.split("-")[1]) <= st.completed:
                shutil.rmtree(d, ignore_errors=True)

    def _kept_path(self, key: str) -> Path:
        return self.root / f"kept-{_safe(key)}.fdg"

    def load_kept(self, st: ServerState) -> dict[str, tuple[str, dict, dict]]:
        """The kept tensors ``st`` lists, each checked against its sha256."""
        out = {}
        for key, digest in st.kept.items():
            try:
                data = self._kept_path(key).read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise WireError("sha256 differs from state.json's")
                frame = wire.decode(data, wire.Expect(kind="kept", job=self.job))
            except (OSError, WireError) as e:
                raise BrokerServerError(f"kept tensors {key!r} are unreadable: {e}") from None
            out[key] = (frame.codec, frame.tensors, frame.params)
        return out

    def save_update(self, round_: int, device: str, payload: bytes) -> None:
        d = self.root / f"round-{round_}"
        d.mkdir(exist_ok=True)
        atomic_write(d / f"{_safe(device)}.fdg", payload)

    def accepted_updates(self, round_: int) -> dict[str, bytes]:
        d = self.root / f"round-{round_}"
        if not d.is_dir():
            return {}
        return {p.stem: p.read_bytes() for p in sorted(d.glob("*.fdg"))}


def _safe(device: str) -> str:
    # Device ids are validated by the service; this guards the file name anyway.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
