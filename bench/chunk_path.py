"""What chunking costs a message at each end, beside decoding the same frame whole.

A device's signed update of the zoo model (``--model``) is cut at ``--max-payload``
as the transport publishes a live message (chunk 0 signed); the receiver's side is
what a transport does with each chunk: the gate's check (``ChunkVerifier.verify``:
chunk 0's signature, the others' digests) and the ``Reassembler``. Both are timed
per message (median of ``--reps`` runs of ``--messages`` messages), beside the
receiver's decode of the whole frame, which a chunked message costs as well. The
process keeps freed heap as an aggregator's does (``device_runtime/heap.py``).

To compare two checkouts side by side, run this file from each in turn with
``FEDGE_ROOT`` naming the checkout to import (a checkout whose reassembler takes
no header from the gate is driven without one).

    python bench/chunk_path.py --json runs/chunk_path.json
"""
from __future__ import annotations

import argparse
import inspect
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(os.environ.get("FEDGE_ROOT", Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from bench.common import command, machine, write_results  # noqa: E402
from device_runtime import heap, wire  # noqa: E402
from device_runtime.chunk_auth import ChunkVerifier  # noqa: E402
from device_runtime.chunking import Reassembler, split  # noqa: E402
from device_runtime.keys import Signer  # noqa: E402

TOPIC = "fedge/bench/round/1/update/d1"


def update_frame(model: str, signer: Signer) -> bytes:
    from device_runtime.training.local import weights_of
    from device_runtime.training.models import ModelConfig, build_model

    w = weights_of(build_model(ModelConfig(model, (40,), 10)))
    return wire.encode(wire.Frame("update", "bench", 1, "d1", "fp32", w,
                                  meta={"samples": 10}, nonce="n" * 32), signer=signer)


def _per_message(fn, messages: int, reps: int) -> float:
    """Median over ``reps`` of the seconds a message, ``fn(i)`` run for ``messages`` i."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(messages):
            fn(i)
        times.append((time.perf_counter() - t0) / messages)
    return statistics.median(times)


def measure(model: str, max_payload: int, messages: int, reps: int) -> dict:
    signer = Signer.generate()
    frame = update_frame(model, signer)
    cut = [split(frame, max_payload, f"{i:016x}", signer, sign_all=False)
           for i in range(messages)]
    hands_header = "header" in inspect.signature(Reassembler.add).parameters
    expect = wire.Expect(job="bench")

    def receive(i: int) -> None:
        gate, r = ChunkVerifier(), Reassembler()
        for c in cut[i]:
            header = gate.verify(TOPIC, c, signer.public, expect)
            whole = r.add(c, TOPIC, header) if hands_header else r.add(c, TOPIC)
        assert whole == frame

    split_s = _per_message(lambda i: split(frame, max_payload, f"{i:016x}", signer,
                                           sign_all=False), messages, reps)
    receive_s = _per_message(receive, messages, reps)
    decode_s = _per_message(lambda i: wire.decode(frame, key=signer.public), messages, reps)
    return {"model": model, "frame_bytes": len(frame), "max_payload": max_payload,
            "chunks": len(cut[0]), "split_ms": round(1e3 * split_s, 4),
            "gate_and_reassemble_ms": round(1e3 * receive_s, 4),
            "whole_decode_ms": round(1e3 * decode_s, 4),
            "chunking_over_decode": round((split_s + receive_s) / decode_s, 3),
            "gate_hands_header": hands_header}


def to_markdown(res: dict) -> str:
    out = ["# Chunking's cost a message\n", f"Machine: {res['machine']}; load {res['load']}; "
           f"code imported from `{res['root']}`. Command: `{res['command']}`.\n",
           "| model | frame bytes | max payload | chunks | split (ms) | gate + reassembly (ms)"
           " | decoding it whole (ms) | chunking / whole decode |",
           "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        out.append(f"| {r['model']} | {r['frame_bytes']:,} | {r['max_payload']} | {r['chunks']} "
                   f"| {r['split_ms']} | {r['gate_and_reassemble_ms']} | {r['whole_decode_ms']} "
                   f"| {r['chunking_over_decode']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn1d", help="zoo models, e.g. cnn1d,cnn-wide")
    ap.add_argument("--max-payload", default="131072")
    ap.add_argument("--messages", type=int, default=100)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="runs/chunk_path.json")
    ap.add_argument("--md")
    args = ap.parse_args()
    heap.keep_freed(heap.SERVER_RETAIN)  # as the aggregator's process does (fedge serve)
    rows = [measure(m, int(p), args.messages, args.reps) for m in args.model.split(",")
            for p in args.max_payload.split(",")]
    write_results({"machine": machine(), "command": command("bench/chunk_path.py"),
                   "root": str(ROOT), "load": [round(x, 2) for x in os.getloadavg()],
                   "rows": rows}, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
