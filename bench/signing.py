"""What signatures cost: a cnn-wide round of 10 devices with signing on, side by side
with the benchmark-only switch that turns signing and verifying off.

Two measurements, both in one JSON file:

- **rounds**: the same simulated job (in-memory transport, cnn-wide on MNIST-1D, 10
  devices, FedAvg fp32) run alternately with signatures on and off, ``--reps`` times
  each; the median round wall time of each and their ratio. On a shared machine the
  noise between runs can exceed the difference; the next measurement does not
  depend on it.
- **operations**: every signature operation of one such round, timed on the real
  frames (medians of ``--ops-reps``): the aggregator signs the model frame, 10 tasks
  and their chunks; each device verifies its task and the model frame and signs its
  status and update (and its chunks); the aggregator verifies them. Their sum over
  the measured round time is the share of the round that signatures cost.

    python bench/signing.py --json docs/results/signing.json --md docs/results/signing.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import (command, machine, passive_waits, threads_arg,  # noqa: E402
                          use_threads, write_results)

passive_waits()  # before torch loads (below)
from device_runtime import chunking, keys, messages, wire  # noqa: E402
from device_runtime.chunk_auth import ChunkVerifier  # noqa: E402
from device_runtime.keys import Signer  # noqa: E402

DEVICES = 10
MAX_PAYLOAD = 128 * 1024


def _round_times(signed: bool, rounds: int, seed: int) -> list[float]:
    from toolkit.sim.simulate import SimOptions, run_simulation

    keys.BENCH_ONLY_SKIP_SIGNATURES = not signed
    try:
        report, _ = run_simulation(SimOptions(devices=DEVICES, rounds=rounds, seed=seed,
                                              model="cnn-wide", epochs=1,
                                              profiles=("rpi4",)))
    finally:
        keys.BENCH_ONLY_SKIP_SIGNATURES = False
    return [r["seconds"] for r in report["rounds"]]


def _median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _operations(reps: int) -> dict:
    """Seconds of signature work in one cnn-wide round of DEVICES devices."""
    from device_runtime.training.local import weights_of
    from toolkit.model import zoo

    cfg = zoo.make_config("cnn-wide", (40,), 10, 1.0, 0.0, 1.0)
    weights = weights_of(zoo.build_model(cfg))
    server, device = Signer.generate(), Signer.generate()
    model = wire.encode(wire.Frame("model", "j", 1, "server", "fp32", weights), signer=server)
    update = wire.encode(wire.Frame("update", "j", 1, "d0", "fp32", weights, nonce="n"),
                         signer=device)
    task = messages.seal(messages.Task(
        round=1, device="d0", variant="full", model_sha256="0" * 64, deadline=0.0, epochs=1,
        batch_size=32, lr=0.02, seed=0, codec="fp32", nonce="n"),
        "j", "server", server, 1, "n", "d0")
    header_bytes = {name: 8 + int.from_bytes(frame[4:8], "little")
                    for name, frame in (("model", model), ("update", update))}
    chunked = chunking.split(model, MAX_PAYLOAD, "c", server)
    chunks = len(chunked)
    topic = "fedge/j/round/1/model/full"

    def sign(frame_name):
        head = (model if frame_name == "model" else update)[:header_bytes[frame_name]]
        return lambda: server.sign(head)

    def verify(frame, signer):
        h = 8 + int.from_bytes(frame[4:8], "little")
        sig, head = frame[h:h + 64], frame[:h]
        return lambda: signer.public.verify(sig, head)

    verifier = ChunkVerifier()
    verifier.verify(topic, chunked[0], server.public, wire.Expect())
    per = {"sign_model": _median_time(sign("model"), reps),
           "sign_update": _median_time(sign("update"), reps),
           "sign_small": _median_time(lambda: server.sign(task[:300]), reps),
           "verify_model": _median_time(verify(model, server), reps),
           "verify_update": _median_time(verify(update, device), reps),
           "verify_small": _median_time(verify(task, server), reps),
           # a chunk after its message's chunk 0: parsed and hashed, not verified
           "check_chunk_by_digest": _median_time(
               lambda: verifier.verify(topic, chunked[1], server.public, wire.Expect()), reps)}
    # Per round: the aggregator signs 1 model frame (and its chunks) and DEVICES tasks;
    # each device verifies its task, the model (its chunk 0 by signature, the other
    # chunks by digest) and signs a status and its update (and its chunk 0); the
    # aggregator verifies each status, update and its chunks the same way.
    small = DEVICES * 2 * (per["sign_small"] + per["verify_small"])
    frames = (per["sign_model"] + per["verify_model"] * DEVICES
              + DEVICES * (per["sign_update"] + per["verify_update"]))
    # The retained model's chunks are each signed (they arrive in the broker's order);
    # an update's, published live, only its chunk 0.
    checks = per["verify_small"] + (chunks - 1) * per["check_chunk_by_digest"]
    frame_chunks = (chunks * per["sign_small"] + DEVICES * checks  # the model
                    + DEVICES * (per["sign_small"] + checks))  # the updates
    return {"per_operation_us": {k: round(v * 1e6, 1) for k, v in per.items()},
            "chunks_per_frame": chunks, "model_bytes": len(model),
            "round_seconds": round(small + frames + frame_chunks, 5)}


def run(reps: int, rounds: int, ops_reps: int) -> dict:
    ops = _operations(ops_reps)
    on, off = [], []
    for rep in range(reps):  # alternated, so load drifts hit both
        off += _round_times(False, rounds, rep)
        on += _round_times(True, rounds, rep)
    med_on, med_off = statistics.median(on), statistics.median(off)
    return {"machine": machine(), "load": os.getloadavg(), "command": command("bench/signing.py"),
            "devices": DEVICES, "model": "cnn-wide", "rounds_per_run": rounds, "reps": reps,
            "round_seconds_signed": on, "round_seconds_unsigned": off,
            "median_signed": med_on, "median_unsigned": med_off,
            "ratio_signed_over_unsigned": round(med_on / med_off, 4),
            "operations": ops,
            "signature_share_of_round": round(ops["round_seconds"] / med_on, 5)}


def to_markdown(r: dict) -> str:
    ops = r["operations"]
    rows = "\n".join(f"| {k} | {v:,.1f} |" for k, v in ops["per_operation_us"].items())
    return f"""# Signatures: what they cost a round

`{r['command']}` on {r['machine']}, load average {', '.join(f'{x:.1f}' for x in r['load'])}
(shared machine: absolute times are inflated, compare within a row).

cnn-wide ({ops['model_bytes']:,} B model frame, {ops['chunks_per_frame']} chunks of 128 KiB),
{r['devices']} devices, FedAvg fp32, in-memory transport, {r['reps']} runs of
{r['rounds_per_run']} rounds each way, alternated.

| | median round (s) |
|---|---|
| signed (the product) | {r['median_signed']:.2f} |
| signatures off (`BENCH_ONLY_SKIP_SIGNATURES`) | {r['median_unsigned']:.2f} |
| ratio | {r['ratio_signed_over_unsigned']:.3f} |

Every signature operation of one round, timed on the real frames (sign: the
header; verify: Ed25519 over the header; the body's sha256 is computed with or
without signatures, by the decoder). A retained message's chunks are each signed, a
live one's (an update) only chunk 0; a receiver verifies chunk 0 and checks the
others by the digests it names (`device_runtime/chunk_auth.py`):

| operation | µs (median) |
|---|---|
{rows}

Sum for one round: {ops['round_seconds'] * 1e3:.1f} ms,
**{100 * r['signature_share_of_round']:.2f}%** of the signed round's median wall time.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ops-reps", type=int, default=200)
    p.add_argument("--json", default="runs/signing.json")
    p.add_argument("--md")
    threads_arg(p)
    a = p.parse_args()
    use_threads(a.threads)
    write_results(run(a.reps, a.rounds, a.ops_reps), a.json, a.md, to_markdown)


if __name__ == "__main__":
    main()
