"""Cutting a frame above a broker's payload limit into chunk frames: the sender's side
of the format ``device_runtime.chunking`` puts back together (its docstring has it).

``split`` builds each chunk frame itself, so each slice of the payload is hashed and
copied once (the whole message is named by those digests, ``chunk_root``): the bytes
are those ``wire.encode`` would make of the same chunk (tests/test_chunking.py
compares them), as every receiver's decoder expects.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from typing import TYPE_CHECKING

from device_runtime.errors import WireError
from device_runtime.wire import MAGIC, MAX_HEADER, SIGNATURE, VERSION, peek_header
from device_runtime.wire_checks import SIGNED_VERSION

if TYPE_CHECKING:
    from device_runtime.keys import Signer


def split(data: bytes, max_payload: int, chunk_id: str, signer: Signer | None = None,
          sign_all: bool = True) -> list[bytes]:
    """``[data]`` if it fits in ``max_payload`` bytes, else chunk frames that each fit,
    signed by ``signer`` (with the frame's nonce and addressee) if given, so a receiver
    can refuse a forged chunk before it holds it. Signed, chunk 0 also names the digest
    of every other chunk (``chunk.parts``), so a receiver that verified it checks the
    rest by a hash (``device_runtime.chunk_auth``). ``sign_all`` False signs chunk 0
    only: for a message published live, whose chunks arrive in order; a retained
    one's come in the broker's order, and each must be checkable on its own."""
    if len(data) <= max_payload:
        return [data]
    head = peek_header(data)
    view = memoryview(data).cast("B")
    auth = head.get("auth", {}) if signer else {}
    origin = (head["job"], head["round"], head["device"], head["codec"])
    root, bodies = hashlib.sha256(b"").hexdigest(), []

    def chunk(index: int, count: int, payload: memoryview, parts: list | None = None,
              signed: bool = True, by: Signer | _SizeOnly | None = signer
              ) -> tuple[bytes, bytes]:
        c = {"id": chunk_id, "index": index, "count": count, "sha256": root}
        if parts is not None:
            c["parts"] = parts
        # An unsigned chunk is vouched for by chunk 0 (its digest of this chunk's header)
        return chunk_frame(origin, c, payload, by if signed else None,
                           auth.get("nonce", "") if signed else "",
                           auth.get("to", "") if signed else "",
                           bodies[index] if bodies else None)

    # The header of chunk 0 of 1 with an empty slice, plus room for the widest
    # index, count, shape and nbytes any chunk can have: an upper bound for all.
    overhead = (len(chunk(0, 1, view[:0], by=signer and _SizeOnly(signer.key_id))[0])
                + 2 * len(str(len(data))) + 2 * len(str(max_payload)))
    step = max_payload - overhead
    if step < 1:
        raise WireError(f"max_payload: expected more than {overhead} bytes (a chunk's own "
                        f"header), got {max_payload}")
    count, first = _layout(len(data), step, manifest=signer is not None)
    starts = [0] + [first + i * step for i in range(count - 1)] + [len(data)]
    pieces = [view[starts[i]:starts[i + 1]] for i in range(count)]
    # Each slice is hashed once: its digest is its chunk's body sha256, and the digests
    # hashed together are the whole message's (``chunk_root``)
    bodies = [hashlib.sha256(piece).digest() for piece in pieces]
    root = chunk_root(bodies).hex()
    if first == step:  # no manifest: unsigned, or too many chunks for one header
        return [chunk(i, count, pieces[i])[0] for i in range(count)]
    rest = [chunk(i, count, pieces[i], signed=sign_all) for i in range(1, count)]
    parts = [hashlib.sha256(signed_part).hexdigest()[:32] for _, signed_part in rest]
    return [chunk(0, count, pieces[0], parts)[0]] + [c for c, _ in rest]


class _SizeOnly:
    """A signer's stand-in where only a chunk's length matters: its key id, and a
    signature of the right length that is never computed."""

    def __init__(self, key_id: str) -> None:
        self.key_id = key_id

    def sign(self, data: bytes) -> bytes:
        return bytes(SIGNATURE)


def chunk_root(bodies: list[bytes]) -> bytes:
    """A chunked message's digest (``chunk.sha256``): the sha256 of its chunks' body
    digests (32 bytes each, in index order). Each chunk's body is checked against its
    own digest, so this binds the whole as a sha256 of the whole frame would, without
    hashing the frame a second time at either end."""
    return hashlib.sha256(b"".join(bodies)).digest()


def chunk_frame(origin: tuple[str, int, str, str], chunk: dict, payload: memoryview,
                signer: Signer | None = None, nonce: str = "", to: str = "",
                body_sha256: bytes | None = None) -> tuple[bytes, bytes]:
    """The bytes ``wire.encode`` makes of the chunk frame of ``payload`` (job, round,
    device and codec from ``origin``, a validated header's), and its signed part (magic,
    length, header: what chunk 0 names it by, ``wire.signed_digest``). Built here
    rather than by ``encode``: a chunk's header is known valid by construction, and
    the payload is hashed (unless its ``body_sha256`` is given) and copied once, straight
    from the frame being cut (tests/test_chunking.py checks the bytes are encode's)."""
    n = len(payload)
    header = {"v": SIGNED_VERSION if signer else VERSION, "kind": "chunk", "job": origin[0],
              "round": origin[1], "device": origin[2], "codec": origin[3],
              "sha256": (body_sha256 or hashlib.sha256(payload).digest()).hex(),
              "tensors": [{"name": "data", "dtype": "uint8", "shape": [n], "offset": 0,
                           "nbytes": n, "params": {}}],
              "meta": {}, "chunk": chunk}
    if signer is not None:
        header["auth"] = {"key": signer.key_id, "nonce": nonce, "to": to}
    raw = json.dumps(header, separators=(",", ":"), allow_nan=False).encode("ascii")
    if len(raw) > MAX_HEADER:
        raise WireError(f"header length: expected at most {MAX_HEADER} bytes, got {len(raw)} "
                        f"(a chunk header)")
    signed = b"".join((MAGIC, struct.pack("<I", len(raw)), raw))
    return b"".join((signed, signer.sign(signed) if signer else b"", payload)), signed


DIGEST_ROOM = 35  # one digest in chunk 0's header: '"' + 32 hex digits + '",'
MANIFEST_MAX = 48 * 1024  # header bytes chunk 0 may spend on digests (MAX_HEADER is 64 KiB)


def _layout(size: int, step: int, manifest: bool) -> tuple[int, int]:
    """(chunks, bytes in chunk 0) for ``size`` bytes at ``step`` per chunk; chunk 0
    is shorter by the room its digests of the others take (``first == step``: none)."""
    count = math.ceil(size / step)
    if not manifest:
        return count, step
    while True:  # the digests shorten chunk 0, which may add a chunk: at most a few turns
        room = 16 + DIGEST_ROOM * count
        first = step - room
        if first < 1 or room > MANIFEST_MAX:
            return math.ceil(size / step), step
        need = 1 + math.ceil(max(0, size - first) / step)
        if need <= count:
            return need, first
        count = need
