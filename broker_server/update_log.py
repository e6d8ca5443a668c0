"""The open round's accepted updates, appended to one file: ``round-<r>.log``.

Each update is a record: ``FDGU``, the device id's length (u16) and the payload's
(u32), little-endian, then the id (UTF-8) and the payload as received (a signed
wire frame). One file a round, not one a device: creating, renaming and fsyncing a
file per update (and its folder) cost the server about 0.5 ms of CPU an update, 7 ms
of a 41 ms round at 16 devices (bench/field.py, the saving knocked out side by side);
an append is one ``pwritev`` into the page cache, and the syncer fsyncs the one file.

A SIGKILL can cut the last record short (a write interrupted by a fatal signal, or a
full disk). Reading stops at the first record that is not whole and says where;
``UpdateLog`` cuts the file back to the last whole record before it appends again,
so what is appended after a restart is never hidden behind a torn record. A failed
append is cut back the same way at once.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

MAGIC = b"FDGU"
HEAD = struct.Struct("<4sHI")  # magic, id length, payload length
MAX_ID = 0xFFFF


@dataclass
class LogRead:
    """What a log holds: its whole records in order, and where they end; ``torn`` says
    why the bytes after ``end`` are not a record (empty: there are none)."""

    records: list[tuple[str, bytes]] = field(default_factory=list)
    end: int = 0
    torn: str = ""
    torn_device: str = ""  # the torn record's device, if its id was whole


def read_log(path: Path) -> LogRead:
    """The records of the log at ``path``, read one at a time (OSError if it cannot be
    read)."""
    out, at = LogRead(), 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while at < size:
            out.torn, device, record = _record(f, at, size)
            if record is None:
                out.torn_device = device
                break
            out.records.append((device, record[0]))
            at = record[1]
    out.end = at
    return out


def _record(f: BinaryIO, at: int, size: int
            ) -> tuple[str, str, tuple[bytes, int] | None]:
    """('', device, (payload, where the next record starts)) for the record at ``at``,
    else (why it is not whole, its device if that much was written, None)."""
    head = f.read(HEAD.size)
    if len(head) < HEAD.size:
        return f"byte {at}: {len(head)} bytes, shorter than a record's head", "", None
    magic, n_id, n_payload = HEAD.unpack(head)
    if magic != MAGIC:
        return f"byte {at}: expected a record ({MAGIC!r}), got {magic!r}", "", None
    name = f.read(n_id)
    try:
        device = name.decode("utf-8") if len(name) == n_id else ""
    except UnicodeDecodeError:
        return f"byte {at}: the record's device id is not UTF-8", "", None
    end = at + HEAD.size + n_id + n_payload
    if end > size:
        return (f"byte {at}: a record of {n_payload} payload bytes, "
                f"{max(0, size - at - HEAD.size - n_id)} of them written"), device, None
    return "", device, (f.read(n_payload), end)


class UpdateLog:
    """One round's log, open for appending (the file is created on first use)."""

    def __init__(self, path: Path, end: int | None = None) -> None:
        """``end``: where its whole records end, if the caller read it; else it is read
        here when the file exists (a round reopened after a restart)."""
        self.path = path
        if end is None and path.exists():
            end = read_log(path).end
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            self.end = end or 0
            os.ftruncate(self._fd, self.end)  # a torn tail goes before anything follows
        except OSError:
            os.close(self._fd)
            raise

    def append(self, device: str, payload: bytes) -> None:
        """One record, whole or not at all (OSError after cutting a partial one back)."""
        name = device.encode("utf-8")
        if len(name) > MAX_ID:
            raise ValueError(f"device id: expected at most {MAX_ID} bytes, got {len(name)}")
        parts = [HEAD.pack(MAGIC, len(name), len(payload)), name, payload]
        size = sum(len(p) for p in parts)
        try:
            done = os.pwritev(self._fd, parts, self.end)
            while done < size:  # rare: a regular file takes a whole write
                rest = memoryview(b"".join(parts))[done:]
                done += os.pwrite(self._fd, rest, self.end + done)
        except OSError:
            try:
                os.ftruncate(self._fd, self.end)
            except OSError:
                pass  # reading stops at the torn record; the next open cuts it
            raise
        self.end += size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
