"""Benchmark decode + aggregate throughput per codec, side by side with Flower's FedAvg.

For N updates of P parameters: fedge decodes each frame (wire checks) and
folds it into the round's aggregate exactly as the aggregator does (FedAvg's
fold for fp32/fp16/int8/fedmrn, signSGD's vote for sign, majority and federated
voting), then computes the new global model;
Flower deserializes each update (``parameters_to_ndarrays``) and runs
``flwr.server.strategy.aggregate.aggregate`` on fp32 arrays, all in memory, so
combinations above --flower-max-gb are skipped for it. Throughput is MB/s of
fp32-equivalent (N * P * 4 bytes / seconds), median of --repeats runs.

flwr is a benchmark-only dependency; run it from a venv that has it, e.g.:

    python -m venv --system-site-packages /tmp/flwrenv && /tmp/flwrenv/bin/pip install flwr
    /tmp/flwrenv/bin/python bench/aggregate.py --md docs/results/aggregate.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command, machine, write_results  # noqa: E402
from broker_server.strategies import FedAvg, SignSGD, SignSGDOptions  # noqa: E402
from device_runtime import codecs, wire  # noqa: E402
from device_runtime.codecs import CodecContext  # noqa: E402

CODECS = ("fp32", "fp16", "int8", "fedmrn", "sign-mv", "sign-fv")
ONE_BIT = ("fedmrn", "sign-mv", "sign-fv")
DISTINCT = 4  # distinct frames per run, reused cyclically (decoding cost is the same)
ONE_BIT_DISTINCT = 32  # for sign votes


def _model(params: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"w": rng.normal(size=(params // 1000, 1000)).astype(np.float32),
            "b": rng.normal(size=1000).astype(np.float32)}


def _frames(codec_name: str, ref: dict, n: int, seed: int = 7) -> tuple[list[bytes], dict]:
    codec, rng = codecs.get(codec_name), np.random.default_rng(1)
    frames = []
    # 1-bit votes cost more where devices nearly tie, as few distinct frames would.
    for k in range(min(n, ONE_BIT_DISTINCT) if codec_name == "sign" else DISTINCT):
        ctx = CodecContext(1, seed, ref, f"d{k}")
        if codec_name == "fedmrn":  # a trained mask: reference + noise * bits
            from device_runtime.codecs.fedmrn import noise

            w = {n: (ref[n] + noise(n, v.shape, seed, codec.scale) *
                     rng.integers(0, 2, v.shape)).astype(np.float32) if v.ndim >= 2 else v
                 for n, v in ref.items()}
        else:
            w = {n: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32)
                 for n, v in ref.items()}
        t, p = codec.encode(w, ctx)
        frames.append(wire.encode(wire.Frame("update", "b", 1, f"d{k}", codec_name, t, p)))
    spec = codec.wire_spec({n: v.shape for n, v in ref.items()})
    return frames, spec


def _strategy(arm: str, n: int):
    if not arm.startswith("sign-"):
        return FedAvg()
    s = SignSGD(options=SignSGDOptions(arm[5:], warmup_rounds=0))
    for i in range(n):  # federated voting with history: mixed, non-trivial weights
        s.votes.record(f"d{i}", 600 + (i * 37) % 390, 1000)
    return s


def fedge_seconds(arm: str, ref: dict, n: int) -> float:
    codec_name = arm.split("-")[0]
    codec, strategy = codecs.get(codec_name), _strategy(arm, n)
    frames, spec = _frames(codec_name, ref, n)
    expect = wire.Expect(kind="update", codec=codec_name, tensors=spec)
    t0 = time.perf_counter()
    fold = strategy.fold(1, ref, codec, CodecContext(1, 7, ref))
    for i in range(n):
        f = wire.decode(frames[i % len(frames)], expect)
        fold.add(f"d{i}", 10 + i % 7 + 300 * (i % 3), f.tensors, f.params)
    fold.result()
    return time.perf_counter() - t0


def flower_seconds(ref: dict, n: int) -> float:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate

    rng = np.random.default_rng(1)
    blobs = [ndarrays_to_parameters([v + rng.normal(scale=0.01, size=v.shape).astype(np.float32)
                                     for v in ref.values()]) for _ in range(DISTINCT)]
    t0 = time.perf_counter()
    results = [(parameters_to_ndarrays(blobs[i % DISTINCT]), 10 + i % 7 + 300 * (i % 3))
               for i in range(n)]
    aggregate(results)
    return time.perf_counter() - t0


def run(sizes: list[int], counts: list[int], repeats: int, flower_max_gb: float,
        max_gb: float) -> list[dict]:
    rows = []
    for p in sizes:
        ref = _model(p)
        total = sum(v.size for v in ref.values())
        for n in counts:
            mb = n * total * 4 / 1e6
            if mb / 1e3 > max_gb:  # too long for every arm on this machine
                continue
            arms = {c: (lambda c=c: fedge_seconds(c, ref, n)) for c in CODECS}
            if mb / 1e3 <= flower_max_gb:
                arms = {"flower_fp32": lambda: flower_seconds(ref, n), **arms}
            row = {"params": total, "updates": n, "fp32_mb": round(mb, 1)}
            for name, seconds in _interleaved(arms, repeats if mb <= 4000 else 1,
                                              warm=mb <= 1000).items():
                row[name] = round(mb / seconds, 1)
            if "flower_fp32" in row:
                row["x_flower"] = {c: round(row[c] / row["flower_fp32"], 2) for c in ONE_BIT}
            print(row, flush=True)
            rows.append(row)
    return rows


def _interleaved(arms: dict, repeats: int, warm: bool) -> dict[str, float]:
    """Median seconds per arm, the arms taking turns in every repeat (and once untimed
    first), so that allocator and cache state favour none of them."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for rep in range(repeats + (1 if warm else 0)):
        for name, f in arms.items():
            t = f()
            if rep or not warm:
                times[name].append(t)
    return {name: statistics.median(t) for name, t in times.items()}


def to_markdown(res: dict) -> str:
    head = ("| params | updates | Flower fp32 | " + " | ".join(f"fedge {c}" for c in CODECS)
            + " | " + " | ".join(f"{c} / Flower" for c in ONE_BIT) + " |")
    lines = ["# Aggregation throughput (decode + FedAvg), MB/s of fp32-equivalent\n",
             f"Machine: {res['machine']}; median of {res['repeats']} runs (1 above 4 GB), "
             "the arms taking turns in each repeat after one untimed run. "
             f"Command: `{res['command']}`. Flower is skipped where its all-in-memory "
             "aggregation would exceed the memory cap.\n", head,
             "|" + "---|" * (3 + len(CODECS) + len(ONE_BIT))]
    for r in res["rows"]:
        cells = [f"{r['params']:,}", str(r["updates"]), str(r.get("flower_fp32", "skipped"))]
        cells += [str(r[c]) for c in CODECS]
        ratios = r.get("x_flower", {})
        cells += [f"{ratios[c]:.2f}x" if c in ratios else "" for c in ONE_BIT]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100000,1000000,10000000")
    ap.add_argument("--counts", default="10,100,1000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--flower-max-gb", type=float, default=4.0)
    ap.add_argument("--max-gb", type=float, default=10.0, help="skip larger combinations")
    ap.add_argument("--json", default="runs/bench_aggregate.json")
    ap.add_argument("--md")
    args = ap.parse_args()
    rows = run([int(s) for s in args.sizes.split(",")], [int(c) for c in args.counts.split(",")],
               args.repeats, args.flower_max_gb, args.max_gb)
    write_results({"machine": machine(), "command": command("bench/aggregate.py"),
                   "repeats": args.repeats, "rows": rows}, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
