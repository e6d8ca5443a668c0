"""Chunking of frames above a broker's payload limit, and their reassembly."""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from typing import Callable

import numpy as np
import pytest

from device_runtime import chunking
from device_runtime.chunking import Reassembler, ReassemblyLimits, split
from device_runtime.errors import ChunkRefusedError, WireError
from device_runtime.topics import sender_of
from device_runtime.wire import Expect, Frame, decode, encode
from testkit.chunk_flood import flood_chunks, traced_bytes
from testkit.timing import scaled
from tests.conftest import ROOT
from tests.test_wire import GOOD, _frame

# --- chunking ----------------------------------------------------------------

BIG = _frame(w=np.random.default_rng(1).normal(size=20_000).astype(np.float32))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_frame_that_fits_is_not_split():
    assert split(GOOD, len(GOOD), "cid") == [GOOD]


@pytest.mark.parametrize("max_payload", [450, 1000, 4096, 65536])
def test_split_chunks_fit_and_carry_the_original_header(max_payload):
    chunks = split(BIG, max_payload, "cid")
    assert len(chunks) > 1 and all(len(c) <= max_payload for c in chunks)
    pieces = [decode(c).tensors["data"].tobytes() for c in chunks]
    # the message's digest: the sha256 of its pieces' sha256s, in order (docs/protocol.md)
    root = hashlib.sha256(b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()
    for i, c in enumerate(chunks):
        f = decode(c, Expect(kind="chunk", job="job", round=3, devices=frozenset({"dev-1"}),
                             codec="fp32"))
        assert f.chunk == {"id": "cid", "index": i, "count": len(chunks), "sha256": root}
    assert b"".join(pieces) == BIG


@pytest.mark.parametrize("signed,sign_all", [(False, True), (True, True), (True, False)])
def test_split_builds_the_chunk_frames_encode_would(signed, sign_all):
    # split builds chunk frames itself (one hash and one copy of the payload); a
    # decoder must see exactly the frames the generic encoder makes of the same chunks
    from device_runtime.keys import FleetKeys
    from device_runtime.wire import peek_header

    signer = FleetKeys().server if signed else None
    w = {"w": np.arange(9000, dtype=np.float32)}
    frame = encode(Frame("model", "job", 3, "server", "fp32", w, nonce="n1", to="d1"),
                   signer=signer) if signed else BIG
    chunks = split(frame, 4096, "cid", signer, sign_all)
    assert len(chunks) > 2
    for c in chunks:
        got = decode(c)
        again = encode(Frame("chunk", got.job, got.round, got.device, got.codec,
                             {"data": got.tensors["data"]}, chunk=got.chunk, nonce=got.nonce,
                             to=got.to), signer=signer if peek_header(c)["v"] == 2 else None)
        assert again == c
    r = Reassembler()
    assert [r.add(c, "t") for c in chunks][-1] == frame


def test_split_refuses_a_payload_limit_too_small_to_progress():
    with pytest.raises(WireError, match=r"max_payload: expected more than \d+ bytes"):
        split(BIG, 300, "cid")
    with pytest.raises(WireError, match="frame magic"):
        split(b"not a frame at all" * 10, 100, "cid")


@pytest.mark.parametrize("order", ["in order", "shuffled", "duplicated", "frames"])
def test_reassembly(order):
    chunks = split(BIG, 4096, "cid")
    rng = random.Random(0)
    if order == "shuffled":
        rng.shuffle(chunks)
    elif order == "duplicated":
        chunks = chunks + chunks[: len(chunks) // 2]
        rng.shuffle(chunks)
    elif order == "frames":
        chunks = [decode(c) for c in chunks]
    r = Reassembler()
    out = [r.add(c) for c in chunks]
    assert [o for o in out if o is not None] == [BIG]
    assert r.held_bytes == 0
    assert all(r.add(c) is None for c in chunks[:3])  # a late redelivery is ignored


def test_a_missing_chunk_expires_after_the_timeout():
    clock = FakeClock()
    r = Reassembler(ReassemblyLimits(ttl=10), clock=clock)
    chunks = split(BIG, 4096, "cid")
    assert all(r.add(c) is None for c in chunks[:-1])
    assert r.held_bytes > 0
    clock.now = 9.0
    assert r.expire() == 0 and r.held_bytes > 0
    clock.now = 10.5
    assert r.expire() == 1 and r.held_bytes == 0
    assert r.add(chunks[-1]) is None and r.held_bytes == 0  # too late: still nothing


def test_a_corrupted_chunk_is_rejected_and_its_message_dropped():
    chunks = split(BIG, 4096, "cid")
    bad = bytearray(chunks[2])
    bad[-1] ^= 0xFF
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(WireError, match="header.sha256"):
        r.add(bytes(bad))
    assert r.held_bytes == 0
    assert all(r.add(c) is None for c in chunks)


def test_a_substituted_chunk_fails_the_message_digest():
    # a chunk whose own body sha256 is right (it was re-encoded) but whose bytes are
    # not the sender's: the digests put back do not hash to chunk.sha256
    chunks = split(BIG, 4096, "cid")
    f = decode(chunks[1])
    forged = encode(Frame("chunk", f.job, f.round, f.device, f.codec,
                          {"data": f.tensors["data"][::-1].copy()}, chunk=f.chunk))
    r = Reassembler()
    with pytest.raises(WireError, match="sha256 of the chunks' digests: expected"):
        for c in [chunks[0], forged, *chunks[2:]]:
            r.add(c)
    assert r.held_bytes == 0
    # and chunks that arrive out of order are put back by index, digests too
    r = Reassembler()
    assert [r.add(c) for c in [chunks[2], chunks[0], chunks[1], *chunks[3:]]][-1] == BIG


def test_a_header_the_gate_validated_is_not_parsed_again_but_the_body_is_checked():
    # a transport's gate hands the reassembler the chunk's header (wire.peek_header's)
    from device_runtime.wire import peek_header

    chunks = split(BIG, 4096, "cid")
    headers = [peek_header(c) for c in chunks]
    r = Reassembler()
    assert [r.add(c, "t", h) for c, h in zip(chunks, headers)][-1] == BIG
    # a header not of these bytes: the body does not hash to it
    with pytest.raises(WireError, match="header.sha256: expected the body's sha256"):
        Reassembler().add(chunks[1], "t", headers[2])
    with pytest.raises(WireError, match="header.kind: expected 'chunk'"):
        Reassembler().add(GOOD, "t", peek_header(GOOD))


def test_inconsistent_chunks_are_rejected():
    chunks = split(BIG, 4096, "cid")
    f = decode(chunks[1])
    other_count = encode(Frame("chunk", f.job, f.round, f.device, f.codec, f.tensors,
                               chunk={**f.chunk, "count": f.chunk["count"] + 1}))
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(WireError, match=r"chunk 'cid' index 1: count: expected \d+ \(as in its "
                                        r"first chunk\), got \d+"):
        r.add(other_count)
    r = Reassembler()
    r.add(chunks[1])
    changed = encode(Frame("chunk", f.job, f.round, f.device, f.codec,
                           {"data": f.tensors["data"] ^ 1}, chunk=f.chunk))
    with pytest.raises(WireError, match="expected the same bytes as its first copy"):
        r.add(changed)
    assert r.held_bytes == 0
    with pytest.raises(WireError, match="header.kind: expected 'chunk', got 'update'"):
        Reassembler().add(GOOD)


def test_a_message_past_the_byte_cap_is_refused_at_its_first_chunk_and_others_complete():
    chunks = split(BIG, 1000, "cid")
    probe = Reassembler()
    probe.add(chunks[0], "fedge/job/round/3/update/dev-1")
    room = probe.charged_bytes  # what one message is charged from its first chunk on
    r = Reassembler(ReassemblyLimits(max_bytes=room + room // 2))
    assert r.add(chunks[0], "fedge/job/round/3/update/dev-1") is None
    held = r.held_bytes
    with pytest.raises(ChunkRefusedError, match=rf"bytes held in all: expected at most "
                                                 rf"{room + room // 2}, got {2 * room}"):
        r.add(chunks[0], "fedge/job/round/3/update/dev-2")
    assert r.held_bytes == held and r.partials == 1  # the refusal changed nothing
    # The admitted message had its room reserved: it completes.
    assert [x for x in (r.add(c, "fedge/job/round/3/update/dev-1") for c in chunks[1:])
            if x is not None] == [BIG]
    assert r.held_bytes == r.charged_bytes == 0
    assert r.add(chunks[0], "fedge/job/round/3/update/dev-2") is None  # room again


def _flood(sender: str, n: int, topic: str | None = None, count: int = 2) -> list[tuple]:
    """n one-byte chunks from ``sender``, each starting a message (a topic each by default)."""
    return [(topic or f"fedge/job/round/{i + 1}/update/{sender}",
             encode(Frame("chunk", "job", i + 1, sender, "fp32",
                          {"data": np.zeros(1, np.uint8)},
                          chunk={"id": f"{sender}-{i}", "index": 0, "count": count,
                                 "sha256": "ab" * 32})))
            for i in range(n)]


def test_a_flooding_sender_is_capped_and_another_senders_message_still_completes():
    lim = ReassemblyLimits(max_partials_per_sender=4, max_partials_per_topic=2,
                           max_bytes_per_sender=1 << 20)
    r = Reassembler(lim)
    honest = split(BIG, 4096, "cid")
    mine = "fedge/job/round/3/update/dev-1"
    out = [r.add(honest[0], mine)]
    for i, (topic, data) in enumerate(_flood("evil", 10)):
        before = (r.held_bytes, r.charged_bytes, r.partials)
        if i < 4:
            assert r.add(data, topic) is None
        else:
            with pytest.raises(ChunkRefusedError, match=r"incomplete messages from 'device/evil':"
                                                        r" expected at most 4, got 5"):
                r.add(data, topic)
            assert (r.held_bytes, r.charged_bytes, r.partials) == before
        out.append(r.add(honest[i + 1], mine))  # interleaved with the flood
    on_one = _flood("evil2", 3, topic="fedge/job/round/1/update/evil2")
    r.add(on_one[0][1], on_one[0][0]), r.add(on_one[1][1], on_one[1][0])
    with pytest.raises(ChunkRefusedError, match=r"incomplete messages on this topic: "
                                                r"expected at most 2, got 3"):
        r.add(on_one[2][1], on_one[2][0])
    huge = _flood("evil3", 1, count=10**6)[0]  # claims a message of a million chunks
    with pytest.raises(ChunkRefusedError, match=r"bytes held for 'device/evil3': expected at "
                                                r"most 1048576, got \d+"):
        r.add(huge[1], huge[0])
    # The honest message's chunk id on another sender's topic, inconsistent: only
    # that sender's own message goes.
    f = decode(honest[1])
    for count in (2, 3):
        clash = encode(Frame("chunk", f.job, f.round, "evil4", f.codec, f.tensors,
                             chunk={**f.chunk, "count": count}))
        if count == 2:
            r.add(clash, "fedge/job/round/3/update/evil4")
        else:
            with pytest.raises(WireError, match="count: expected 2"):
                r.add(clash, "fedge/job/round/3/update/evil4")
    out += [r.add(c, mine) for c in honest[11:]]
    assert [x for x in out if x is not None] == [BIG]


def test_limits_must_be_positive():
    with pytest.raises(ValueError, match=r"ReassemblyLimits.max_partials_per_topic: expected "
                                         r"> 0, got 0"):
        ReassemblyLimits(max_partials_per_topic=0)


def test_the_sender_is_named_by_the_topic():
    assert sender_of("fedge/j/round/3/update/d0") == "device/d0"
    assert sender_of("fedge/j/round/3/acts/d0") == sender_of("fedge/j/devices/d0/status")
    assert sender_of("fedge/j/workers/w1/partial") == "worker/w1"
    assert sender_of("fedge/j/round/3/model/full") == "aggregator"
    assert sender_of("fedge/j/round/3/task/d0") == "aggregator"  # addressed to d0, not by it
    assert sender_of("other/topic") == "other/topic"
    assert sender_of("fedge/bad job!/x/y") == "fedge/bad job!/x/y"


def test_byte_accounting_matches_tracemalloc_within_the_documented_overhead():
    """held_bytes counts what tracemalloc measures, erring high (the constants are a
    little above their measures), never lower than by the slack: a container that
    happens to resize in the window, or an interpreter cache, is not per message."""
    r = Reassembler()
    flood = flood_chunks(2001)
    honest = [("fedge/job/round/3/update/dev-1", c) for c in split(BIG, 4096, "cid")]
    # First-use allocations of the decoder (json's, not ours) out of the measure.
    r.add(flood[0][1], flood[0][0])
    r.add(split(BIG, 4096, "warm-up")[0], "fedge/job/round/3/update/dev-2")

    def held_by(items: list) -> tuple[int, int]:
        held = r.held_bytes

        def work() -> None:
            for topic, data in items:
                r.add(data, topic)

        return traced_bytes(work), r.held_bytes - held

    slack = 2048  # what interpreter caches outside the reassembler may keep meanwhile
    actual, counted = held_by(flood[1:])
    assert actual - slack <= counted <= 1.3 * actual, (actual, counted)  # ~0.9 KiB each
    actual, counted = held_by(honest[:-1])
    assert actual - slack <= counted <= 1.05 * actual, (actual, counted)
    assert r.add(honest[-1][1], honest[-1][0]) == BIG


def test_expiry_drops_old_messages_first_and_add_does_it_too():
    clock = FakeClock()
    r = Reassembler(ReassemblyLimits(ttl=10, max_closed=3), clock=clock)
    for t, (topic, data) in enumerate(flood_chunks(5)):
        clock.now = float(t)
        r.add(data, topic)
    one = r.held_bytes // 5
    clock.now = 11.5  # the messages of t = 0 and 1 are older than 10 s
    assert r.expire() == 2 and r.partials == 3 and r.held_bytes == 3 * one
    clock.now = 13.5
    r.add(*reversed(flood_chunks(1, 5)[0]))  # no expire() call: add drops t = 2, 3
    assert r.partials == 2
    assert len(r._closed) == 3  # finished ids remembered: max_closed at most
    clock.now = 30
    assert r.expire() == 2 and r.held_bytes == r.charged_bytes == 0
    assert not r._partials and not r._by_sender and not r._by_topic
    clock.now = 40.5  # and the ids of those closed at 30 are forgotten 10 s later
    assert r.expire() == 0 and not r._closed


def _lines_run(work: Callable[[], None]) -> int:
    """Lines of device_runtime/chunking.py executed by ``work()`` (a count of operations)."""
    n = 0

    def local(frame, event, arg):
        nonlocal n
        n += event == "line"
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename == chunking.__file__ else None

    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(None)
    return n


@pytest.mark.slow  # fills a reassembler with 30k messages
def test_a_chunk_costs_the_same_with_30k_messages_held_as_with_1k():
    """Structural, not timed: the lines of chunking.py one chunk runs (add, then expire as
    the transport of 95ffc1f did) do not grow with the messages held, and expiring N
    messages costs N times one (O(1) amortized). The old code summed and scanned all."""
    r = Reassembler(ReassemblyLimits(ttl=3600))
    items = flood_chunks(30_040)

    def one(topic: str, data: bytes) -> Callable[[], None]:
        return lambda: (r.add(data, topic), r.expire())

    for topic, data in items[:1000]:
        r.add(data, topic)
    at_1k = [_lines_run(one(*items[1000 + i])) for i in range(20)]
    for topic, data in items[1020:30_020]:
        r.add(data, topic)
    assert r.partials == 30_020
    at_30k = [_lines_run(one(*items[30_020 + i])) for i in range(20)]
    assert max(at_30k) <= max(at_1k), (at_1k, at_30k)
    r.limits = ReassemblyLimits(ttl=1e-9)  # everything is now old
    per_message = _lines_run(r.expire) / 30_040
    assert r.partials == 0 and per_message < 40, per_message


@pytest.mark.parametrize("first, second", [("chunking", "wire"), ("wire", "chunking")])
def test_wire_imports_without_torch_in_either_order(first, second):
    code = ("import sys; sys.modules['torch'] = None\n"
            f"import device_runtime.{first}, device_runtime.{second}\n"
            "from device_runtime.chunking import Reassembler, split\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m]]\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=scaled(60))
    assert p.returncode == 0, p.stderr
