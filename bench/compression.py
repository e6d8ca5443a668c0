"""Benchmark the uplink codecs on MNIST-1D non-IID: accuracy against bytes.

Arms (same seeds, same partition per seed): FedAvg with fp32, fp16, int8 and
fedmrn updates; signSGD with majority vote and with federated voting, both with
mixed minibatch sizes (60% of the devices at 4, 40% at 128, as in the paper).
Arms ending in ``-50k`` run on a 50,000-sample MNIST-1D (``mnist1d:50000``), where
a shard is many times the big minibatch (154, the paper's), as in the paper.
Per arm: final accuracy (mean and spread over seeds), uplink bytes per device
per round and the ratio to fp32, and rounds to reach 90% of fp32's final
accuracy. Writes JSON and a markdown table.

    python bench/compression.py --seeds 0,1,2 --json docs/results/compression.json \\
        --md docs/results/compression.md
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (command, machine, passive_waits, provenance,  # noqa: E402
                          threads_arg, use_threads, write_results)

passive_waits()  # before torch loads (below)

from broker_server.strategies import SignSGDOptions  # noqa: E402
from toolkit.sim.simulate import SimOptions, run_simulation  # noqa: E402


def arms(devices: int, rounds: int, sign_rounds: int, wide_rounds: int, fedmrn_codec: str
         ) -> dict:
    small = int(round(devices * 0.6))
    mixed = {f"dev-{k}": (4 if k < small else 128) for k in range(devices)}
    mixed32 = {d: min(b, 32) for d, b in mixed.items()}
    mixed154 = {d: (154 if b > 4 else 4) for d, b in mixed.items()}
    base = SimOptions(devices=devices, rounds=rounds, alpha=0.5,
                      profiles=("rpi3b", "rpi4", "rpi5", "jetson-orin-nano"))
    sign = dict(strategy="signsgd", codec="sign", rounds=sign_rounds)
    wide = replace(base, model="cnn-wide", rounds=wide_rounds)
    big = replace(base, dataset=f"mnist1d:{BIG_SAMPLES}")
    return {
        "fedavg-fp32": base,
        "fedavg-fp16": replace(base, codec="fp16"),
        "fedavg-int8": replace(base, codec="int8"),
        "fedavg-fedmrn": replace(base, codec=fedmrn_codec),
        "signsgd-mv": replace(base, **sign, strategy_options=SignSGDOptions(
            "mv", server_lr=0.005, batch_by_device=mixed)),
        "signsgd-fv": replace(base, **sign, strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed)),
        "signsgd-fv-pairs": replace(base, **sign, strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed, estimate="pairs")),
        "signsgd-fv-coord": replace(base, **sign, strategy_options=SignSGDOptions(
            "fv", per_coordinate=True, server_lr=0.005, batch_by_device=mixed)),
        # The paper's setting: mixed minibatches on (near) IID shards.
        "signsgd-mv-iid": replace(base, **sign, alpha=100.0, strategy_options=SignSGDOptions(
            "mv", server_lr=0.005, batch_by_device=mixed)),
        "signsgd-fv-iid": replace(base, **sign, alpha=100.0, strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed)),
        "signsgd-fv-pairs-iid": replace(base, **sign, alpha=100.0,
                                        strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed, estimate="pairs")),
        # Big devices at batch 32 (not 128, over half of a 240-sample shard) and the
        # server step halved every 50 rounds (a constant step swings the last round).
        "signsgd-mv-iid32-hl": replace(base, **sign, alpha=100.0, strategy_options=SignSGDOptions(
            "mv", server_lr=0.005, batch_by_device=mixed32, server_lr_half_life=50)),
        "signsgd-fv-iid32-hl": replace(base, **sign, alpha=100.0, strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed32, server_lr_half_life=50)),
        # The paper's regime: shards of ~2,700 (15 devices) against a big batch of 154.
        "fedavg-fp32-50k": big,
        "signsgd-mv-50k": replace(big, **sign, strategy_options=SignSGDOptions(
            "mv", server_lr=0.005, batch_by_device=mixed154, server_lr_half_life=50)),
        "signsgd-fv-50k": replace(big, **sign, strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed154, server_lr_half_life=50)),
        "signsgd-mv-iid-50k": replace(big, **sign, alpha=100.0, strategy_options=SignSGDOptions(
            "mv", server_lr=0.005, batch_by_device=mixed154, server_lr_half_life=50)),
        "signsgd-fv-iid-50k": replace(big, **sign, alpha=100.0, strategy_options=SignSGDOptions(
            "fv", server_lr=0.005, batch_by_device=mixed154, server_lr_half_life=50)),
        # signSGD-FV as its authors' code runs it (SignSGDOptions.paper(): counters per
        # device and coordinate, gamma 1, the full vote as reference, 100 warm-up rounds)
        "signsgd-fv-paper": replace(base, **sign, strategy_options=replace(
            SignSGDOptions.paper(), server_lr=0.005, batch_by_device=mixed)),
        "signsgd-fv-paper-50k": replace(big, **sign, strategy_options=replace(
            SignSGDOptions.paper(), server_lr=0.005, batch_by_device=mixed154,
            server_lr_half_life=50)),
        "fedavg-fp32-wide": wide,
        "fedavg-fedmrn-wide": replace(wide, codec=fedmrn_codec),
    }


BIG_SAMPLES = 50_000
SUFFIXES = ("-wide", "-50k")  # an arm is compared with fedavg-fp32 of its suffix


def run_arm(opts: SimOptions, seeds: list[int]) -> list[dict]:
    runs = []
    for s in seeds:
        t0 = time.time()
        report, _ = run_simulation(replace(opts, seed=s))
        per_round = [r["uplink_bytes"] / max(r["devices_reporting"], 1) for r in report["rounds"]]
        runs.append({"seed": s, "accuracy": [r["accuracy"] for r in report["rounds"]],
                     "final_accuracy": report["final_accuracy"],
                     "uplink_per_device_round": statistics.median(per_round),
                     "seconds": round(time.time() - t0, 1)})
        print(f"  seed {s}: final {report['final_accuracy']:.4f}, "
              f"{runs[-1]['uplink_per_device_round']:,.0f} B/device/round", flush=True)
    return runs


def rounds_to(acc: list[float], target: float) -> int | None:
    return next((i + 1 for i, a in enumerate(acc) if a >= target), None)


def baseline_of(arm: str) -> str:
    """Each arm is compared with FedAvg-fp32 on the same model and data."""
    return "fedavg-fp32" + next((x for x in SUFFIXES if arm.endswith(x)), "")


def summarize(results: dict) -> dict:
    out = {}
    for name, runs in results.items():
        fp32 = results[baseline_of(name)]
        fp32_final = statistics.mean(r["final_accuracy"] for r in fp32)
        fp32_up = statistics.mean(r["uplink_per_device_round"] for r in fp32)
        finals = [r["final_accuracy"] for r in runs]
        up = statistics.mean(r["uplink_per_device_round"] for r in runs)
        reach = [rounds_to(r["accuracy"], 0.9 * fp32_final) for r in runs]
        out[name] = {"model": "cnn-wide" if name.endswith("-wide") else "cnn",
                     "dataset": f"mnist1d:{BIG_SAMPLES}" if name.endswith("-50k") else "mnist1d",
                     "final_mean": round(statistics.mean(finals), 4),
                     "final_std": round(statistics.pstdev(finals), 4),
                     "uplink_bytes_per_device_round": round(up),
                     "ratio_to_fp32": round(fp32_up / up, 2),
                     "rounds": len(runs[0]["accuracy"]),
                     "rounds_to_90pct_of_fp32": reach,
                     "gap_to_fp32_points": round(100 * (fp32_final - statistics.mean(finals)),
                                                 2)}
    return out


def to_markdown(res: dict) -> str:
    lines = ["# Compression benchmark: MNIST-1D, Dirichlet 0.5\n",
             f"{res['devices']} devices, seeds {res['seeds']}; machine {res['machine']}. "
             "Command: " + "; ".join(f"`{c}`" for c in (
                 res["command"] if isinstance(res["command"], list) else [res["command"]]))
             + ".\n",
             "| arm | model | data | rounds | final accuracy (mean ± sd) | points below fp32 "
             "| uplink B / device / round | fp32 / arm | rounds to 90% of fp32 final (per seed) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['model']} | {s['dataset']} | {s['rounds']} "
                     f"| {s['final_mean']:.4f} ± {s['final_std']:.4f} | {s['gap_to_fp32_points']} "
                     f"| {s['uplink_bytes_per_device_round']:,} | {s['ratio_to_fp32']}x "
                     f"| {s['rounds_to_90pct_of_fp32']} |")
    return "\n".join(lines) + "\n"


def combine(paths: list[str]) -> dict:
    """One result from several runs of this bench (same seeds and fleet): their arms
    side by side, each compared with the baseline of its own run's model and data."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = dict(parts[0], runs={}, command=[])
    for p in parts:
        for key in ("seeds", "devices"):
            if p[key] != res[key]:
                sys.exit(f"--combine: {key} differs: {p[key]!r} vs {res[key]!r}")
        res["runs"].update(p["runs"])
        res["command"] += p["command"] if isinstance(p["command"], list) else [p["command"]]
    res["summary"] = summarize(res["runs"])
    return {**res, **provenance(parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--sign-rounds", type=int, default=150)
    ap.add_argument("--wide-rounds", type=int, default=20)
    ap.add_argument("--fedmrn-codec", default="fedmrn")
    ap.add_argument("--arms", help="comma list (default: all)")
    ap.add_argument("--combine", help="comma list of JSON results to join (their runs, "
                    "summarized again; each arm with its baseline)")
    ap.add_argument("--json", default="runs/bench_compression.json")
    ap.add_argument("--md")
    threads_arg(ap)
    args = ap.parse_args()
    use_threads(args.threads)
    if args.combine:
        res = combine(args.combine.split(","))
        write_results(res, args.json, args.md, to_markdown)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    chosen = arms(args.devices, args.rounds, args.sign_rounds, args.wide_rounds,
                  args.fedmrn_codec)
    if args.arms:
        wanted = set(args.arms.split(","))
        chosen = {k: v for k, v in chosen.items()
                  if k in wanted or k in {baseline_of(a) for a in wanted}}
    results = {}
    for name, opts in chosen.items():
        print(name, flush=True)
        results[name] = run_arm(opts, seeds)
    res = {"machine": machine(), "seeds": seeds, "devices": args.devices,
           "command": command("bench/compression.py"),
           "runs": results, "summary": summarize(results)}
    write_results(res, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
