"""The aggregator's durable state: what survives a SIGKILL.

Layout of ``--state-dir``::

    state.json          completed rounds, history, the current global file name, the
                        last round's accepted change norms (broker_server/guard.py)
    registered.json     each device's sample count as first seen online (the guard's
                        cap on its weight), rewritten when a new device appears
    global-<r>.fdg      the global weights after round r (a wire frame, no pickle)
    kept-<name>.fdg     tensors the strategy keeps across rounds (``Strategy.kept``),
                        rewritten only when they change; state.json lists the live ones
    round-<r>/<id>.fdg  every update accepted in the open round r, as received

Every file is written atomically (temp file, fsync, rename, fsync of the
folder), and ``state.json`` is written last, so after a crash the state is
either the previous round's or the new one's, never a mix; accepted updates
of the open round are reloaded, so none is lost. The updates are made durable in
groups (``sync_updates``, called by the aggregator once it has handled every queued
message): written and renamed at once, and fsynced off the aggregator's thread by
``syncer.py`` (each file once, then its folder), so that no update waits for a disk
commit (16 updates a round: their fsyncs were the largest part of the aggregator's
time a round, docs/results/field.md). A SIGKILL loses none of them (the page cache
outlives the process); a power cut can lose those of the last few milliseconds,
whose devices are asked again like any device that has not reported.

Damage is named, not fatal where it need not be: an unreadable saved update, or one
whose header names another job, round or device, is skipped with its file named (the
aggregator counts it rejected and asks the device again); an entry of the folder that
is none of the above (a ``round-old`` folder) is left alone with one warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime import wire
from device_runtime.errors import WireError
from broker_server.errors import BrokerServerError
from broker_server.syncer import Syncer

log = logging.getLogger("fedge.server")


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Temp file, rename; ``durable``: fsync the file before and its folder after
    (without: the caller syncs later, as ``StateStore.sync_updates`` does)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if not durable:
        return
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
    norms: list = field(default_factory=list)  # the last round's accepted change norms
    registered: dict = field(default_factory=dict)  # device -> samples (registered.json)


class StateStore:
    def __init__(self, root: str | Path, job: str):
        self.root = Path(root)
        self.job = job
        self.root.mkdir(parents=True, exist_ok=True)
        self.warned: set[str] = set()  # stray entries already warned about
        self.unsynced: list[Path] = []  # updates saved, not yet handed to the syncer
        self.syncer = Syncer()

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def load(self) -> tuple[ServerState, dict | None]:
        """The saved state and global weights, or a fresh state and None."""
        if not self.state_path.exists():
            return ServerState(self.job, registered=self._load_registered()), None
        try:
            d = json.loads(self.state_path.read_text())
            st = ServerState(d["job"], d["completed"], d["global_file"], d["history"],
                             d.get("extra", {}), d.get("kept", {}), d.get("norms", []))
            if not isinstance(st.norms, list) or not all(
                    _number(n) and math.isfinite(n) and n >= 0 for n in st.norms):
                raise TypeError(f"norms: expected a list of finite numbers >= 0, got "
                                f"{str(st.norms)[:60]}")
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise BrokerServerError(f"state {self.state_path} is unreadable: {e}") from None
        st.registered = self._load_registered()
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
             "history": st.history, "extra": st.extra, "kept": st.kept, "norms": st.norms},
            indent=1).encode())
        for key in stale:
            self._kept_path(key).unlink(missing_ok=True)
        if old and old != name:
            (self.root / old).unlink(missing_ok=True)
        for d in self.root.glob("round-*"):
            r = self._round_of(d)
            if r is not None and r <= st.completed:
                shutil.rmtree(d, ignore_errors=True)

    def _round_of(self, d: Path) -> int | None:
        """r for a ``round-<r>`` folder; None (and one warning) for anything else there."""
        number = d.name.removeprefix("round-")
        if d.is_dir() and number.isdigit() and number.isascii():
            return int(number)
        if d.name not in self.warned:
            self.warned.add(d.name)
            log.warning("state dir %s: ignoring %s (not a round-<number> folder of fedge's)",
                        self.root, d)
        return None

    @property
    def registered_path(self) -> Path:
        return self.root / "registered.json"

    def save_registered(self, st: ServerState) -> None:
        atomic_write(self.registered_path, json.dumps(
            {"job": st.job, "devices": st.registered}, sort_keys=True).encode())

    def _load_registered(self) -> dict[str, int]:
        if not self.registered_path.exists():
            return {}
        try:
            d = json.loads(self.registered_path.read_text())
            devices = d.get("devices") if isinstance(d, dict) else None
            if not isinstance(devices, dict) or not all(
                    isinstance(n, int) and not isinstance(n, bool) for n in devices.values()):
                raise ValueError("expected {job, devices: {device: int}}")
        except (OSError, ValueError) as e:
            raise BrokerServerError(f"state {self.registered_path} is unreadable: {e}") from None
        if d.get("job") != self.job:
            raise BrokerServerError(f"state {self.registered_path} belongs to job "
                                    f"{d.get('job')!r}, not {self.job!r}")
        return devices

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
        """Write an accepted update (temp file, rename); durable at ``sync_updates``."""
        d = self.root / f"round-{round_}"
        d.mkdir(exist_ok=True)
        path = d / f"{_safe(device)}.fdg"
        atomic_write(path, payload, durable=False)
        self.unsynced.append(path)

    def sync_updates(self) -> None:
        """Hand the updates saved since the last call to the syncer (syncer.py), which
        fsyncs them and their folders off this thread; ``flush`` waits for it."""
        self.syncer.submit(self.unsynced)
        self.unsynced = []

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every update handed over is durable (False: ``timeout`` passed)."""
        return self.syncer.flush(timeout)

    def accepted_updates(self, round_: int
                         ) -> tuple[dict[str, tuple[wire.Frame, bytes]], list[tuple[str, str]]]:
        """The updates saved in round ``round_``: ({device: (frame, payload)}, [(device,
        why)] for each file that cannot be read or whose header is not this job's update
        from that device in that round (named in ``why``)."""
        d = self.root / f"round-{round_}"
        good, bad = {}, []
        if not d.is_dir():
            return good, bad
        for p in sorted(d.glob("*.fdg")):
            expect = wire.Expect(kind="update", job=self.job, round=round_,
                                 devices=frozenset([p.stem]))
            try:
                payload = p.read_bytes()
                good[p.stem] = (wire.decode(payload, expect), payload)
            except (OSError, WireError) as e:
                bad.append((p.stem, f"saved update {p} is unusable: {e}"))
        return good, bad


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _safe(device: str) -> str:
    # Device ids are validated by the service; this guards the file name anyway.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
