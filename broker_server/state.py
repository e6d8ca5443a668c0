"""The aggregator's durable state: what survives a SIGKILL.

Layout of ``--state-dir``::

    state.json          completed rounds, the current global file name, the last
                        round's accepted change norms (broker_server/guard.py), the
                        number of round records and the last RECENT of them
    history.jsonl       the round records, one JSON object a line, appended
    registered.json     each device's sample count as first seen online (the guard's
                        cap on its weight), rewritten when a new device appears
    global-<r>.fdg      the global weights after round r (a wire frame, no pickle)
    kept-<name>.fdg     tensors the strategy keeps across rounds (``Strategy.kept``),
                        rewritten only when they change; state.json lists the live ones
    round-<r>.log       every update accepted in the open round r, as received,
                        appended (update_log.py)

The history is appended, not rewritten: state.json holding every round record made
closing round r cost O(r x devices) (a 200-round run at 16 devices: 30% of the server's
Python time). The append is fsynced off the aggregator's thread like the updates;
state.json keeps the last ``RECENT`` records, so a power cut that loses the last lines
of history.jsonl loses no record (at load, lines past the count state.json names are
dropped).

Every other file is written atomically (temp file, fsync, rename, fsync of the
folder), and ``state.json`` is written last, so after a crash the state is
either the previous round's or the new one's, never a mix; accepted updates
of the open round are reloaded, so none is lost. The updates are made durable in
groups (``sync_updates``, called by the aggregator once it has handled every queued
message): appended to the round's log at once, and fsynced off the aggregator's
thread by ``syncer.py`` (the log, then its folder), so that no update waits for a
disk commit (16 updates a round: their fsyncs were the largest part of the
aggregator's time a round, docs/results/field.md). A SIGKILL loses none of them
(the page cache outlives the process); a power cut can lose those of the last few
milliseconds, whose devices are asked again like any device that has not reported.

Damage is named, not fatal where it need not be: an unreadable saved update (a
record torn by a crash), or one whose header names another job, round or device, is
skipped with its log named (the aggregator counts it rejected and asks the device
again); an entry of the folder that is none of the above (a ``round-old`` folder) is
left alone with one warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime import wire
from device_runtime.errors import WireError
from broker_server.errors import BrokerServerError
from broker_server.syncer import Syncer
from broker_server.update_log import UpdateLog, read_log

log = logging.getLogger("fedge.server")
HISTORY = "history.jsonl"
RECENT = 4  # round records kept in state.json too (the syncer lags a round at most)


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
        self._log: tuple[int, UpdateLog] | None = None  # the open round's, for appending
        self._log_ends: dict[int, int] = {}  # where a read log's whole records end
        self.syncer = Syncer()
        self._persisted: int | None = None  # records in history.jsonl (None: unknown)

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def load(self) -> tuple[ServerState, dict | None]:
        """The saved state and global weights, or a fresh state and None."""
        if not self.state_path.exists():
            return ServerState(self.job, registered=self._load_registered()), None
        try:
            d = json.loads(self.state_path.read_text())
            st = ServerState(d["job"], d["completed"], d["global_file"], [],
                             d.get("extra", {}), d.get("kept", {}), d.get("norms", []))
            if not isinstance(st.norms, list) or not all(
                    _number(n) and math.isfinite(n) and n >= 0 for n in st.norms):
                raise TypeError(f"norms: expected a list of finite numbers >= 0, got "
                                f"{str(st.norms)[:60]}")
            st.history = self._load_history(d)
        except (OSError, ValueError, KeyError, TypeError) as e:
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
        self._append_history(st.history)
        atomic_write(self.state_path, json.dumps(
            {"job": st.job, "completed": st.completed, "global_file": st.global_file,
             "history_records": len(st.history), "recent": st.history[-RECENT:],
             "extra": st.extra, "kept": st.kept, "norms": st.norms}).encode())
        for key in stale:  # here: a later round may keep the same name again
            self._kept_path(key).unlink(missing_ok=True)
        # The rest that state.json (durable now) no longer names goes on the syncer's
        # thread: names no later round writes again.
        gone = []
        if old and old != name:
            gone.append(self.root / old)
        if self._log is not None and self._log[0] <= st.completed:
            self._close_log()
        for d in self.root.glob("round-*"):
            r = self._round_of(d)
            if r is not None and r <= st.completed:
                gone.append(d)
        self.syncer.remove(gone)

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY

    def _append_history(self, history: list[dict]) -> None:
        """The records not yet in history.jsonl appended (the whole file rewritten if
        what it holds is unknown: a fresh store, or a load that found it differ), made
        durable by the syncer before ``flush`` returns."""
        start = self._persisted if self._persisted is not None and \
            self._persisted <= len(history) else None
        lines = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n"
                         for r in history[start or 0:])
        if start is None:
            atomic_write(self.history_path, lines, durable=False)
        elif lines:
            with open(self.history_path, "ab") as f:
                f.write(lines)
        self._persisted = len(history)
        self.syncer.submit([self.history_path])

    def _load_history(self, d: dict) -> list[dict]:
        records, in_step = read_history(self.root, d)
        self._persisted = len(records) if in_step else None
        return records

    def _round_of(self, d: Path) -> int | None:
        """r for a ``round-<r>.log`` (or an older fedge's ``round-<r>`` folder); None
        (and one warning) for anything else there."""
        number = d.name.removeprefix("round-")
        if d.is_dir() or not number.endswith(".log"):
            ok = d.is_dir()
        else:
            number, ok = number.removesuffix(".log"), d.is_file()
        if ok and number.isdigit() and number.isascii():
            return int(number)
        if d.name not in self.warned:
            self.warned.add(d.name)
            log.warning("state dir %s: ignoring %s (not a round-<number>.log of fedge's)",
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
        """Append an accepted update to its round's log (update_log.py); durable at
        ``sync_updates``."""
        if self._log is None or self._log[0] != round_:
            self._close_log()
            self._log = (round_, UpdateLog(self.root / f"round-{round_}.log",
                                           self._log_ends.pop(round_, None)))
        self._log[1].append(device, payload)
        if self._log[1].path not in self.unsynced:
            self.unsynced.append(self._log[1].path)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log[1].close()
            self._log = None

    def sync_updates(self) -> None:
        """Hand the updates saved since the last call to the syncer (syncer.py), which
        fsyncs them and their folders off this thread; ``flush`` waits for it."""
        self.syncer.submit(self.unsynced)
        self.unsynced = []

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every update handed over is durable and what a closed round left
        is removed (False: ``timeout`` passed)."""
        return self.syncer.flush(timeout)

    def accepted_updates(self, round_: int
                         ) -> tuple[dict[str, tuple[wire.Frame, bytes]], list[tuple[str, str]]]:
        """The updates saved in round ``round_``: ({device: (frame, payload)}, [(device,
        why)] for each record that cannot be read or whose header is not this job's
        update from that device in that round (the log and the fault named in ``why``).
        A torn last record is one of them; the next ``save_update`` cuts it off. (A
        ``round-<r>/`` folder of one file an update, as fedge kept them before the log,
        is read too.)"""
        good, bad = {}, []
        path = self.root / f"round-{round_}.log"
        saved: list[tuple[str, bytes | Path, Path]] = []
        d = self.root / f"round-{round_}"
        if d.is_dir():
            saved += [(p.stem, p, p) for p in sorted(d.glob("*.fdg"))]  # read below
        if path.exists():
            try:
                read = read_log(path)
            except OSError as e:
                bad.append(("", f"saved updates {path} are unreadable: {e}"))
            else:
                if self._log is None or self._log[0] != round_:
                    self._log_ends[round_] = read.end
                saved += [(dev, payload, path) for dev, payload in read.records]
                if read.torn:
                    bad.append((read.torn_device, f"saved updates {path}: torn at {read.torn}"))
        for device, payload, where in saved:
            expect = wire.Expect(kind="update", job=self.job, round=round_,
                                 devices=frozenset([device]))
            try:
                payload = payload.read_bytes() if isinstance(payload, Path) else payload
                good[device] = (wire.decode(payload, expect), payload)
            except (OSError, WireError) as e:
                bad.append((device, f"saved update of {device!r} in {where} is unusable: {e}"))
        return good, bad


def read_history(root: str | Path, state: dict | None = None) -> tuple[list[dict], bool]:
    """The round records of the state in ``root`` (``state``: its state.json, parsed),
    and whether history.jsonl holds exactly them. They are history.jsonl's first lines,
    then the last ``RECENT`` from state.json (the authority for them); a state.json of
    before history.jsonl holds them all. ValueError, KeyError or TypeError if unreadable."""
    root = Path(root)
    d = state if state is not None else json.loads((root / "state.json").read_text())
    if "history" in d:
        if not isinstance(d["history"], list):
            raise TypeError("history: expected a list")
        return d["history"], False
    n, recent = d["history_records"], d["recent"]
    if not (_count(n) and isinstance(recent, list) and len(recent) <= n):
        raise TypeError(f"history_records, recent: expected a count and at most that many "
                        f"records, got {str(n)[:20]} and {type(recent).__name__}")
    lines, path = [], root / HISTORY
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                break  # a line torn by a crash: what follows is not the state's
    need = n - len(recent)
    if len(lines) < need:
        raise TypeError(f"{HISTORY}: expected at least {need} round records, got {len(lines)}")
    return lines[:need] + recent, len(lines) == n


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _safe(device: str) -> str:
    # Device ids are validated by the service; this guards the file name anyway.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in device)
