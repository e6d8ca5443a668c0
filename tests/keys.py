"""The keys of the fleets tests build in-process: one aggregator key, a key per device
made on first use (as ``fedge secure init`` issues them), and shorthands for the
signed messages tests send by hand."""
from __future__ import annotations

import json
import struct
from pathlib import Path

from broker_server.trust import ServerTrust
from device_runtime import messages
from device_runtime.agent import AgentOptions, status_will
from device_runtime.keys import FleetKeys
from device_runtime.topics import Topics

KEYS = FleetKeys()


def agent_options(job: str, device: str, profile: str, **kw) -> AgentOptions:
    return AgentOptions(job, device, profile, key=KEYS.device(device),
                        server_key=KEYS.server.public, **kw)


def will(topics: Topics, device: str) -> tuple[str, bytes]:
    return status_will(topics, device, KEYS.device(device))


def trust(job: str, state_dir: Path | None = None) -> ServerTrust:
    return ServerTrust(job, KEYS.server, KEYS, state_dir)


def status(job: str, st: messages.Status) -> bytes:
    """A device's status as it sends it: signed by its key."""
    return messages.seal(st, job, st.device, KEYS.device(st.device))


def task_of(job: str, payload: bytes) -> messages.Task:
    """A task the aggregator sent (its signature checked)."""
    return messages.unseal(messages.Task, payload, KEYS.server.public, job).msg


def resign(frame: bytes, device: str, nonce: str = "", to: str = "") -> bytes:
    """``frame`` (unsigned, possibly malformed) signed as ``device`` would sign it, so a
    test reaches the checks behind the signature; bytes that are not a frame with a
    JSON object header come back as they are."""
    signer = KEYS.device(device)
    if frame[:4] != b"FDG1" or len(frame) < 8:
        return frame
    (h,) = struct.unpack_from("<I", frame, 4)
    try:
        header = json.loads(frame[8:8 + h])
    except ValueError:
        return frame
    if not isinstance(header, dict) or 8 + h > len(frame):
        return frame
    header["v"] = 2
    header["auth"] = {"key": signer.key_id, "nonce": nonce, "to": to}
    raw = json.dumps(header, separators=(",", ":")).encode()
    signed = b"FDG1" + struct.pack("<I", len(raw)) + raw
    return signed + signer.sign(signed) + frame[8 + h:]
