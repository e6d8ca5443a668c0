"""Versioned, job-bound exports on the device: what it accepts, and what it has accepted.

A signed manifest (``fedge-manifest/2``) carries a ``version`` and the ``job`` it
was made for. A device running a job refuses a manifest made for another job or
for none; and it keeps, per job, the highest version it has accepted in a small
ledger, ``$FEDGE_HOME/accepted-exports.json`` (``FEDGE_HOME`` defaults to
``~/.fedge``; a bundle's unit sets it to the install's ``var/``)::

    {"format": "fedge-accepted/1",
     "jobs": {"field-1": {"version": 4, "key_id": "<16 hex>", "time": 1767225600.0}}}

An older version than the ledger's is refused, naming both, unless the operator
says ``--allow-rollback``: then it is accepted and the lower version becomes the
one recorded. An equal version is accepted (a restart re-checks the same
export). The ledger is written atomically, mode 0600, under a lock, and only
once the export has passed every other check; a ledger that cannot be read or
written is a refusal too (fail closed), naming the file.
"""
from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from device_runtime import verified
from device_runtime.errors import ExportRefusedError
from device_runtime.manifest import Manifest
from device_runtime.signing import parse_document

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux/macOS: the lock is best effort
    fcntl = None  # type: ignore[assignment]

LEDGER_NAME = "accepted-exports.json"
LEDGER_FORMAT = "fedge-accepted/1"
MAX_LEDGER_BYTES = 1 << 20  # a few hundred bytes per job; never read a huge file


def fedge_home() -> Path:
    """``$FEDGE_HOME``, else ``~/.fedge``: the signing key's home on a server, the
    ledger's on a device."""
    return Path(os.environ.get("FEDGE_HOME") or Path.home() / ".fedge").expanduser()


@dataclass(frozen=True)
class ExportPolicy:
    """What a device accepts. ``job``: the job it runs (None: any job's export is taken,
    and its versions are counted under the manifest's own job)."""

    job: str | None = None
    allow_rollback: bool = False  # the operator's word: accept an older version, record it
    ledger: Path | None = None  # default: $FEDGE_HOME/accepted-exports.json

    @property
    def ledger_path(self) -> Path:
        return self.ledger if self.ledger is not None else fedge_home() / LEDGER_NAME

    @property
    def verified_path(self) -> Path:
        """The cache of manifest signatures checked before, beside the ledger."""
        return self.ledger_path.with_name(verified.CACHE_NAME)


def check_binding(manifest: Manifest, policy: ExportPolicy,
                  ledger: bool = True) -> int | None:
    """Refuse (ExportRefusedError) a manifest that is unversioned, for another job, or
    older than the ledger's version for its job; returns that version (None: none yet).
    Reads the ledger only (none with ``ledger=False``: a server checking what a device
    will be given): ``record`` writes it once everything else has passed."""
    where = f"manifest {manifest.root / 'manifest.json'}"
    if manifest.version is None:
        raise ExportRefusedError(f"{where} has no version: a device refuses an "
                                 "unversioned export; re-export it with this fedge")
    if policy.job is not None and manifest.job != policy.job:
        made = f"job {manifest.job!r}" if manifest.job else "no job (exported without --job)"
        raise ExportRefusedError(f"{where} was made for {made}; this device runs job "
                                 f"{policy.job!r} (export with --job {policy.job})")
    if not ledger:
        return None
    accepted = _read(policy.ledger_path).get(_key(manifest, policy), {}).get("version")
    _check_version(where, manifest, accepted, policy)
    return accepted


def record(manifest: Manifest, policy: ExportPolicy) -> None:
    """Record ``manifest``'s version as the accepted one for its job (checked again under
    the lock, so that two processes cannot record out of order)."""
    path = policy.ledger_path
    with _locked(path):
        jobs = _read(path)
        key = _key(manifest, policy)
        where = f"manifest {manifest.root / 'manifest.json'}"
        _check_version(where, manifest, jobs.get(key, {}).get("version"), policy)
        if jobs.get(key, {}).get("version") == manifest.version:
            return  # nothing new: leave the file (and its time) as it is
        jobs[key] = {"version": manifest.version, "key_id": manifest.key_id,
                     "time": round(time.time(), 3)}
        _write(path, {"format": LEDGER_FORMAT, "jobs": jobs})


def _key(manifest: Manifest, policy: ExportPolicy) -> str:
    """The ledger entry: the device's job, else the manifest's ("" for none)."""
    return policy.job if policy.job is not None else (manifest.job or "")


def _check_version(where: str, manifest: Manifest, accepted: int | None,
                   policy: ExportPolicy) -> None:
    if accepted is not None and manifest.version < accepted and not policy.allow_rollback:
        job = _key(manifest, policy)
        raise ExportRefusedError(
            f"{where} is version {manifest.version}, older than version {accepted} this "
            f"device accepted for job {job!r} ({policy.ledger_path}): refused as a "
            "rollback; an operator accepts it with --allow-rollback")


def _read(path: Path) -> dict[str, dict]:
    """The ledger's jobs ({} if there is no ledger yet); damage is a refusal naming it."""
    def bad(why: str) -> ExportRefusedError:
        return ExportRefusedError(f"export ledger {path} is damaged ({why}); it records the "
                                  "export versions this device accepted: restore or remove "
                                  "it (removing it forgets them)")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LEDGER_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise ExportRefusedError(f"export ledger {path}: cannot read "
                                 f"({e.strerror or e})") from None
    if len(raw) > MAX_LEDGER_BYTES:
        raise bad(f"more than {MAX_LEDGER_BYTES} bytes")
    jobs = parse_document(raw, LEDGER_FORMAT, bad).get("jobs")
    if not isinstance(jobs, dict):
        raise bad("jobs: expected an object")
    for job, entry in jobs.items():
        v = entry.get("version") if isinstance(entry, dict) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"jobs.{job}.version: expected an int >= 1, got {v!r}")
    return jobs


def _write(path: Path, doc: dict) -> None:
    """Replace the ledger atomically; the new file is 0600 from its first byte."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise ExportRefusedError(f"export ledger {path}: cannot write "
                                 f"({e.strerror or e})") from None


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``<ledger>.lock`` (the ledger's folder made 0700 if new)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ExportRefusedError(f"export ledger {path}: cannot write "
                                 f"({e.strerror or e})") from None
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
