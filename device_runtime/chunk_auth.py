"""Checking chunks before they are held, at one signature per message, not per chunk.

Every chunk of a signed frame is signed (``chunking.split``), so any chunk can be
checked on its own, in whatever order the broker delivers them (retained chunks
come in the broker's order, not the publisher's). Checking each one costs an
Ed25519 verification (~180 us on these machines): 45 of them for a cnn-wide model
frame at 128 KiB per chunk, on every device, and 45 per update on the aggregator,
which made signatures 9% of a 10-device round (docs/results/signing.md).

So chunk 0 also names, in its signed header (``chunk.parts``), a digest of each
other chunk's signed bytes: magic, length and header, which names the chunk's body
sha256 (checked by the reassembler's decode right after). Once chunk 0 of a message
verified, a later chunk whose signed bytes hash to the digest named for its index is
byte for byte the header the sender signed: a sha256 over a few hundred bytes
instead of a signature check. Any other chunk (its chunk 0 not seen yet, evicted,
or a digest that does not match: a forgery) is checked by its own signature, so the
shortcut never accepts what the signature check would refuse.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

from device_runtime import wire
from device_runtime.errors import WireError
from device_runtime.keys import PublicKey
from device_runtime.wire_checks import check_expect

MAX_MESSAGES = 256  # messages whose digests are remembered (oldest forgotten first)
MAX_DIGESTS = 1 << 16  # digests remembered in all (~5 MiB): a forgetting costs only time


class ChunkVerifier:
    """The digests of the chunks of messages whose chunk 0 verified, per topic, chunk
    id and key. Called from a transport's delivery thread (and tests): locked."""

    def __init__(self, max_messages: int = MAX_MESSAGES, max_digests: int = MAX_DIGESTS):
        self.max_messages, self.max_digests = max_messages, max_digests
        self._known: OrderedDict[tuple, tuple[str, ...]] = OrderedDict()
        self._digests = 0
        self._lock = threading.Lock()
        self.signatures = self.hashed = 0  # chunks checked each way (for tests and benches)

    def verify(self, topic: str, data: bytes | bytearray | memoryview, key: PublicKey,
               expect: wire.Expect) -> dict:
        """The header of a chunk signed by ``key`` (its body is not hashed: the
        reassembler decodes it next), else WireError."""
        header, digest = wire.signed_digest(data)
        c = header.get("chunk")
        if not isinstance(c, dict):
            raise WireError("header.chunk: expected an object in a chunk frame, got nothing")
        name = (topic, c["id"], key.key_id)
        with self._lock:
            parts = self._known.get(name)
        if parts is not None and 0 < c["index"] <= len(parts) and \
                parts[c["index"] - 1] == digest:
            check_expect(header, expect)
            self.hashed += 1
            return header
        wire.check_signature(data, header, key)  # the header parsed once, above
        check_expect(header, expect)
        self.signatures += 1
        if c["index"] == 0 and "parts" in c:
            self._remember(name, tuple(c["parts"]))
        return header

    def _remember(self, name: tuple, parts: tuple[str, ...]) -> None:
        with self._lock:
            old = self._known.pop(name, None)
            self._digests -= len(old or ())
            self._known[name] = parts
            self._digests += len(parts)
            while self._known and (len(self._known) > self.max_messages
                                   or self._digests > self.max_digests):
                _, dropped = self._known.popitem(last=False)
                self._digests -= len(dropped)


__all__ = ["ChunkVerifier"]
