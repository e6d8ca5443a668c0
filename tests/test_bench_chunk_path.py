"""bench/chunk_path.py: a chunked update goes through the transport's receiving path
(gate, then reassembler with the gate's header) and comes back whole."""
from __future__ import annotations

from bench.chunk_path import measure


def test_the_bench_cuts_and_puts_back_a_signed_update_through_the_gate():
    row = measure("cnn1d", 131072, messages=2, reps=1)
    assert row["chunks"] == 3 and row["gate_hands_header"]
    assert row["frame_bytes"] > 3 * 100_000  # it was cut: it exceeds two payloads
    assert min(row["split_ms"], row["gate_and_reassemble_ms"], row["whole_decode_ms"]) > 0
