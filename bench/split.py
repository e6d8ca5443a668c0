"""Benchmark split training: traffic and simulated time to reach a target accuracy.

MNIST-1D, Dirichlet 0.5, the ``cnn-wide`` model (1.4M parameters, weights heavy next
to activations), a fleet of Raspberry Pis and a Jetson Orin. Arms:

- ``fedavg``: classic FedAvg, fp32 weights both ways, every device trains the model;
- ``dpfl``: split learning (SplitFed), per-profile cuts from the planner, fp32
  activations up and gradients down every batch, heads averaged;
- ``ecofed-act8`` / ``ecofed-act4``: the frozen pre-trained head in onnxruntime,
  quantized activations every ``period`` rounds, tails trained on replay buffers
  (fedge's tuned mode: one shared tail, ``--iterations`` server steps a round);
- ``ecofed-paper-act8`` / ``ecofed-paper-act4``: the same with the paper's settings
  (``EcoFedOptions.paper()``: a tail per device averaged, 50 steps at batch 10, only
  the device layers pre-trained).

The target is FedAvg's final accuracy (same seed) minus ``--margin``. Per arm and
seed: the first round at or above the target, the total bytes (up + down, every
frame the aggregator sent or received, assets included) and the simulated time
(each round as long as its slowest device: compute from MACs and GFLOP/s,
transfer from bytes and link rates, a round trip per split-learning batch) up to
it, plus the server's own compute each round: its counted FLOPs at a stated
server's rate (``--server-gflops``, toolkit/sim/server_time.py; reproducible), and
beside it as measured on this machine. Each arm can run in its own process
(``--arms``, ``--json``) and the results be joined with ``--combine``:

    python bench/split.py --arms fedavg,dpfl --json runs/split_a.json
    python bench/split.py --arms ecofed-act8,ecofed-act4 --json runs/split_b.json
    python bench/split.py --combine runs/split_a.json,runs/split_b.json \\
        --json docs/results/split.json --md docs/results/split.md
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

from toolkit.strategies.server.dpfl import DPFLOptions  # noqa: E402
from toolkit.strategies.server.ecofed import EcoFedOptions  # noqa: E402
from toolkit.sim.server_time import DEFAULT_SERVER_GFLOPS  # noqa: E402
from toolkit.sim.simulate import SimOptions, run_simulation  # noqa: E402

PROFILES = ("rpi3b", "rpi4", "rpi5", "jetson-orin-nano")


def arms(devices: int, rounds: int, eco: EcoFedOptions,
         server_gflops: float) -> dict[str, SimOptions]:
    base = SimOptions(devices=devices, rounds=rounds, alpha=0.5, profiles=PROFILES,
                      model="cnn-wide", server_gflops=server_gflops)
    paper = EcoFedOptions.paper()
    return {"fedavg": base,
            "dpfl": replace(base, strategy="dpfl", strategy_options=DPFLOptions()),
            "ecofed-act8": replace(base, strategy="ecofed", codec="act8",
                                   strategy_options=eco),
            "ecofed-act4": replace(base, strategy="ecofed", codec="act4",
                                   strategy_options=eco),
            "ecofed-act8-pertail": replace(base, strategy="ecofed", codec="act8",
                                           strategy_options=replace(eco, shared_tail=False)),
            "ecofed-paper-act8": replace(base, strategy="ecofed", codec="act8",
                                         strategy_options=paper),
            "ecofed-paper-act4": replace(base, strategy="ecofed", codec="act4",
                                         strategy_options=paper)}


def run_arm(name: str, opts: SimOptions, seeds: list[int]) -> list[dict]:
    runs = []
    for s in seeds:
        t0 = time.time()
        report, _ = run_simulation(replace(opts, seed=s))
        rounds, total = [], 0
        for r in report["rounds"]:
            total += r["uplink_bytes"] + r["downlink_bytes"]
            rounds.append({"round": r["round"], "accuracy": r["accuracy"], "bytes": total,
                           "uplink_bytes": r["uplink_bytes"],
                           "downlink_bytes": r["downlink_bytes"],
                           "simulated_elapsed": r["simulated_elapsed"],
                           "simulated_elapsed_measured": r["simulated_elapsed_measured"],
                           "server_flops": r["server_flops"],
                           "server_seconds": r["server_seconds"]})
        runs.append({"seed": s, "rounds": rounds, "final_accuracy": report["final_accuracy"],
                     "cuts": report.get("cuts"), "split_after": report.get("split_after"),
                     "act_shape": report.get("act_shape"),
                     "seconds": round(time.time() - t0, 1)})
        print(f"  {name} seed {s}: final {report['final_accuracy']:.4f} "
              f"({runs[-1]['seconds']} s)", flush=True)
    return runs


def reach(run: dict, target: float) -> dict:
    """The first round at or above ``target``, with the bytes and time spent up to it."""
    for r in run["rounds"]:
        if r["accuracy"] >= target:
            return {"round": r["round"], "bytes": r["bytes"],
                    "simulated_seconds": r["simulated_elapsed"],
                    "simulated_seconds_measured": r["simulated_elapsed_measured"]}
    return {"round": None, "bytes": None, "simulated_seconds": None,
            "simulated_seconds_measured": None}


def summarize(runs: dict[str, list[dict]], margin: float) -> dict:
    targets = {r["seed"]: r["final_accuracy"] - margin for r in runs["fedavg"]}
    out = {}
    for name, arm in runs.items():
        got = [reach(r, targets[r["seed"]]) for r in arm]
        done = [g for g in got if g["round"] is not None]
        last = [r["rounds"][-1] for r in arm]
        out[name] = {
            "final_mean": round(statistics.mean(r["final_accuracy"] for r in arm), 4),
            "final_std": round(statistics.pstdev(r["final_accuracy"] for r in arm), 4),
            "reached": f"{len(done)}/{len(got)}",
            "per_seed": got,
            "bytes_to_target": round(statistics.median(g["bytes"] for g in done)) if done
            else None,
            "seconds_to_target": round(statistics.median(g["simulated_seconds"] for g in done),
                                       1) if done else None,
            "seconds_to_target_measured": round(statistics.median(
                g["simulated_seconds_measured"] for g in done), 1) if done else None,
            "rounds_to_target": statistics.median(g["round"] for g in done) if done else None,
            "bytes_per_round": round(statistics.mean(r["bytes"] / r["round"] for r in last)),
            "server_gflop_per_round": round(statistics.mean(
                q["server_flops"] for r in arm for q in r["rounds"]) / 1e9, 1),
            "server_seconds_per_round": round(statistics.mean(
                q["server_seconds"] for r in arm for q in r["rounds"]), 2),
            "cuts": arm[0]["cuts"] or arm[0]["split_after"]}
    for ref in ("fedavg", "dpfl"):
        base = out[ref]["bytes_to_target"] if ref in out else None
        for s in out.values():
            s[f"traffic_ratio_vs_{ref}"] = round(base / s["bytes_to_target"], 1) \
                if base and s["bytes_to_target"] else None
    return {"targets": targets, "arms": out}


def _mb(b) -> str:
    return "not reached" if b is None else f"{b / 1e6:,.1f}"


def to_markdown(res: dict) -> str:
    s = res["summary"]
    lines = ["# Split training: traffic and time to a target accuracy\n",
             f"MNIST-1D, Dirichlet 0.5, model cnn-wide, {res['devices']} devices "
             f"({', '.join(PROFILES)}, dealt round-robin), {res['rounds']} rounds, seeds "
             f"{res['seeds']}; target = FedAvg's final accuracy (same seed) minus "
             f"{res['margin']}: " + ", ".join(f"seed {k}: {v:.4f}" for k, v in
                                               s["targets"].items())
             + f". EcoFed: {res['ecofed']}. Machine {res['machine']}. Commands: "
             + "; ".join(f"`{c}`" for c in res["command"]) + ".\n",
             "| arm | final accuracy (mean ± sd) | reached | rounds to target | "
             "total MB to target (median) | FedAvg's bytes / the arm's | dpfl's bytes / the "
             "arm's | simulated s to target (server counted) | the same, server as measured "
             "here | MB per round | server GFLOP per round | server s per round (this "
             "machine) | cut |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in s["arms"].items():
        ratios = ["-" if a.get(f"traffic_ratio_vs_{r}") is None else
                  f"{a[f'traffic_ratio_vs_{r}']}" for r in ("fedavg", "dpfl")]
        lines.append(f"| {name} | {a['final_mean']:.4f} ± {a['final_std']:.4f} | "
                     f"{a['reached']} | {a['rounds_to_target']} | "
                     f"{_mb(a['bytes_to_target'])} | {ratios[0]} | {ratios[1]} | "
                     f"{a['seconds_to_target']} | {a['seconds_to_target_measured']} | "
                     f"{a['bytes_per_round'] / 1e6:,.2f} | {a['server_gflop_per_round']} | "
                     f"{a['server_seconds_per_round']} | "
                     f"{a['cuts']} |")
    lines += ["", "Reading the table:", "",
              "- Bytes are every frame the aggregator sent or received: models, tasks, "
              "updates, per-batch activations and gradients (dpfl), the head assets (EcoFed, "
              "once per device).",
              "- Simulated time adds up, round by round, the slowest device's compute (MACs x "
              "samples x passes / GFLOP/s), transfer (its bytes / its link rates) and, for "
              "dpfl, one round trip (`rtt_ms`) per batch, then the server's own compute that "
              "round (EcoFed's tail training, REFT's distillation): its counted FLOPs "
              f"(`server_flops`) at a stated server of {res.get('server_gflops')} GFLOP/s "
              "(toolkit/sim/server_time.py), the same on every run. The next column has "
              "the server's part as measured on this machine instead (`server_seconds`: "
              "the numpy folding too; it varies with the load).",
              "- `ecofed-act8`/`-act4` are fedge's tuned mode (one shared tail, "
              f"{res['ecofed'].get('iterations')} server steps a round); `ecofed-paper-*` the "
              "paper's (`EcoFedOptions.paper()`: a tail per device averaged, 50 steps at batch "
              "10, only the device layers pre-trained); `ecofed-act8-pertail`, when present, "
              "the tuned mode with a tail per device."]
    return "\n".join(lines) + "\n"


def combine(paths: list[str]) -> dict:
    parts = [json.loads(Path(p).read_text()) for p in paths]
    res = dict(parts[0], runs={}, command=[])
    for p in parts:
        for key in ("seeds", "devices", "rounds", "margin", "ecofed", "server_gflops"):
            if p[key] != res[key]:
                sys.exit(f"--combine: {key} differs: {p[key]!r} vs {res[key]!r}")
        res["runs"].update(p["runs"])
        res["command"] += p["command"]
    return {**res, **provenance(parts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--margin", type=float, default=0.02)
    ap.add_argument("--iterations", type=int, default=200, help="EcoFed server steps")
    ap.add_argument("--server-gflops", type=float, default=DEFAULT_SERVER_GFLOPS,
                    help="the stated server's sustained fp32 GFLOP/s, at which the server's "
                    "counted FLOPs are its part of the simulated time")
    ap.add_argument("--arms", help="comma list (default: all)")
    ap.add_argument("--combine", help="comma list of JSON results to join")
    ap.add_argument("--json", default="runs/bench_split.json")
    ap.add_argument("--md")
    threads_arg(ap)
    args = ap.parse_args()
    use_threads(args.threads)
    if args.combine:
        res = combine(args.combine.split(","))
    else:
        eco = EcoFedOptions(iterations=args.iterations, shared_tail=True)
        chosen = arms(args.devices, args.rounds, eco, args.server_gflops)
        if args.arms:
            chosen = {k: v for k, v in chosen.items() if k in set(args.arms.split(","))}
        res = {"machine": machine(), "seeds": [int(s) for s in args.seeds.split(",")],
               "devices": args.devices, "rounds": args.rounds, "margin": args.margin,
               "ecofed": {k: v for k, v in vars(eco).items()},
               "ecofed_paper": dict(vars(EcoFedOptions.paper())),
               "server_gflops": args.server_gflops,
               "command": [command("bench/split.py")], "runs": {}}
        for name, opts in chosen.items():
            print(name, flush=True)
            res["runs"][name] = run_arm(name, opts, res["seeds"])
    if "fedavg" in res["runs"]:
        res["summary"] = summarize(res["runs"], res["margin"])
    write_results(res, args.json, args.md if "summary" in res else None,
                  to_markdown if "summary" in res else lambda r: json.dumps(
                      {k: [x["final_accuracy"] for x in v] for k, v in r["runs"].items()}))


if __name__ == "__main__":
    main()
