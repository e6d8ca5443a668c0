"""Chunking of frames above a broker's payload limit, and their reassembly."""
from __future__ import annotations

import hashlib
import random
import subprocess
import sys

import numpy as np
import pytest

from device_runtime import wire
from device_runtime.errors import WireError
from device_runtime.wire import Expect, Frame, Reassembler, decode, encode, split
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
    for i, c in enumerate(chunks):
        f = decode(c, Expect(kind="chunk", job="job", round=3, devices=frozenset({"dev-1"}),
                             codec="fp32"))
        assert f.chunk == {"id": "cid", "index": i, "count": len(chunks),
                           "sha256": hashlib.sha256(BIG).hexdigest()}
    assert b"".join(decode(c).tensors["data"].tobytes() for c in chunks) == BIG


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
    assert r.pending_bytes == 0
    assert all(r.add(c) is None for c in chunks[:3])  # a late redelivery is ignored


def test_a_missing_chunk_expires_after_the_timeout():
    clock = FakeClock()
    r = Reassembler(timeout_s=10, clock=clock)
    chunks = split(BIG, 4096, "cid")
    assert all(r.add(c) is None for c in chunks[:-1])
    assert r.pending_bytes > 0
    clock.now = 9.0
    assert r.expire() == [] and r.pending_bytes > 0
    clock.now = 10.5
    assert r.expire() == ["cid"] and r.pending_bytes == 0
    assert r.add(chunks[-1]) is None and r.pending_bytes == 0  # too late: still nothing


def test_a_corrupted_chunk_is_rejected_and_its_message_dropped():
    chunks = split(BIG, 4096, "cid")
    bad = bytearray(chunks[2])
    bad[-1] ^= 0xFF
    r = Reassembler()
    r.add(chunks[0])
    with pytest.raises(WireError, match="header.sha256"):
        r.add(bytes(bad))
    assert r.pending_bytes == 0
    assert all(r.add(c) is None for c in chunks)


def test_a_substituted_chunk_fails_the_whole_frame_sha256():
    chunks = split(BIG, 4096, "cid")
    f = decode(chunks[1])
    forged = encode(Frame("chunk", f.job, f.round, f.device, f.codec,
                          {"data": f.tensors["data"][::-1].copy()}, chunk=f.chunk))
    r = Reassembler()
    with pytest.raises(WireError, match="sha256 of the reassembled frame"):
        for c in [chunks[0], forged, *chunks[2:]]:
            r.add(c)
    assert r.pending_bytes == 0


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
    assert r.pending_bytes == 0
    with pytest.raises(WireError, match="header.kind: expected 'chunk', got 'update'"):
        Reassembler().add(GOOD)


def test_max_pending_bytes_is_enforced():
    chunks = split(BIG, 1000, "cid")
    r = Reassembler(max_pending_bytes=2000)
    r.add(chunks[0]), r.add(chunks[1])
    with pytest.raises(WireError, match="pending chunk bytes: expected at most 2000"):
        for c in chunks[2:]:
            r.add(c)
    assert r.pending_bytes == 0


def test_wire_imports_without_torch_in_either_order():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import device_runtime.chunking, device_runtime.wire as w\n"
            "assert w.split is device_runtime.chunking.split and w.Reassembler\n"
            "assert 'torch' not in [m for m in sys.modules if sys.modules[m]]\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    assert wire.Reassembler is Reassembler
