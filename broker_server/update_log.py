"""The open round's accepted updates, appended to one file: ``round-<r>.log``.

Each update is a record: ``FDGU``, the device id's length (u16) and the payload's
(u32), little-endian, then the id (UTF-8) and the payload as received (a signed
wire frame). One file a round, not one a device: creating, renaming and fsyncing a
file per update (and its folder) cost the aggregator's thread about 0.5 ms of CPU an
update, a fifth of a 16-device round (bench/field.py, knocked out side by side); an
append is one ``writev`` into the page cache, and the syncer fsyncs the one file.

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
    """The records of the log at ``path`` (OSError if it cannot be read)."""
    data = memoryview(path.read_bytes())
    out, at = LogRead(), 0
    while at < len(data):
        if len(data) - at < HEAD.size:
            out.torn = f"{len(data) - at} bytes at byte {at}: shorter than a record's head"
            break
        magic, n_id, n_payload = HEAD.unpack_from(data, at)
        if magic != MAGIC:
            out.torn = f"byte {at}: expected a record ({MAGIC!r}), got {bytes(magic)!r}"
            break
        start = at + HEAD.size
        try:
            device = str(data[start:start + n_id], "utf-8") \
                if start + n_id <= len(data) else ""
        except UnicodeDecodeError:
            out.torn = f"byte {at}: the record's device id is not UTF-8"
            break
        stop = start + n_id + n_payload
        if stop > len(data):
            out.torn = (f"byte {at}: a record of {n_payload} payload bytes, "
                        f"{len(data) - start - n_id} of them written")
            out.torn_device = device
            break
        out.records.append((device, bytes(data[start + n_id:stop])))
        at = stop
    out.end = at
    return out


class UpdateLog:
    """One round's log, open for appending (the file is created on first use)."""

    def __init__(self, path: Path, end: int | None = None) -> None:
        """``end``: where its whole records end, if the caller read it; else it is read
        here when the file exists (a round reopened after a restart)."""
        self.path = path
        self.created = not path.exists()
        if end is None and not self.created:
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
