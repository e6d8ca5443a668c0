"""Fleet scale: 1,000 devices per round on one machine, each its own MQTT client.

``fedge simulate``'s own code (``run_simulation`` with ``procs``): the device
agents spread over K worker processes, the aggregator alone in the main process,
a private Mosquitto (``sys_interval 1``, so its ``$SYS`` counters give the broker's
throughput per round). Each arm runs in a child process of its own, on a fresh
broker, so the aggregator's peak RSS is that arm's.

Reported per arm (medians over the rounds, and every round in the JSON): round
wall time, the aggregator's CPU seconds and RSS, the broker's bytes and messages
per second (``$SYS``), the fedge frames per second the aggregator counted, uplink
and downlink bytes per round, accuracy, and the load average around the run (the
machine is shared).

    OMP_NUM_THREADS=1 python bench/fleet.py --procs 4 --tmpfs-procs 4,8 \\
        --json docs/results/fleet.json --md docs/results/fleet.md
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command, machine, write_results  # noqa: E402

MOSQUITTO_CONF = "sys_interval 1\nmax_connections -1\n"
PER_ROUND = ("seconds", "aggregator_cpu_seconds", "aggregator_rss_mb", "frame_bytes_per_s",
             "broker_bytes_received_per_s", "broker_bytes_sent_per_s",
             "broker_messages_received_per_s", "broker_messages_sent_per_s",
             "uplink_bytes", "downlink_bytes")


def run_arm(args: argparse.Namespace) -> dict:
    """One run, in this (child) process: the aggregator here, devices in args.one procs."""
    from toolkit.sim.simulate import SimOptions, run_simulation

    load0 = os.getloadavg()
    t0 = time.time()
    report, _ = run_simulation(SimOptions(
        devices=args.devices, rounds=args.rounds, codec=args.codec, downlink=args.downlink,
        model=args.model, width=args.width, epochs=args.epochs, lr=args.lr,
        profiles=("rpi3b", "rpi4", "rpi5", "jetson-orin-nano"), min_samples=args.min_samples,
        broker=args.broker, procs=args.one, state_parent=args.state_parent or None,
        round_timeout=600), on_round=lambda rec: print(
            f"  round {rec['round']}: {rec['seconds']:.1f} s, aggregator "
            f"{rec['aggregator_cpu_seconds']:.2f} CPU s, accuracy {rec['accuracy']:.3f}",
            flush=True))
    rounds = report["rounds"]
    med = {k: _median([r.get(k) for r in rounds]) for k in PER_ROUND}
    samples = [d["samples"] for d in report["devices"]]
    return {"procs": args.one, "devices": args.devices, "state": args.state_parent or "tmp",
            "medians": med, "round_1_seconds": rounds[0]["seconds"],
            "final_accuracy": report["final_accuracy"],
            "devices_reporting": [r["devices_reporting"] for r in rounds],
            "samples_per_device": {"min": min(samples), "median": statistics.median(samples),
                                   "max": max(samples)},
            "fleet": report["fleet"], "wall_seconds": round(time.time() - t0, 1),
            "load_before": [round(x, 2) for x in load0],
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "rounds": [{k: r.get(k) for k in ("round", "accuracy", "devices_reporting",
                                             *PER_ROUND)} for r in rounds]}


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(float(statistics.median(xs)), 3) if xs else None


def spawn(procs: int, state: str, args: argparse.Namespace, work: Path) -> dict:
    """One arm in a child process, on a fresh Mosquitto."""
    from testkit.brokers import Mosquitto
    from toolkit.sim.simworker import raise_fd_limit

    raise_fd_limit()  # Mosquitto inherits it: 1,000 connections need 1,000+ descriptors
    name = f"{procs}-{'shm' if state else 'tmp'}"
    broker = Mosquitto(work / f"mosq-{name}", extra_conf=MOSQUITTO_CONF).start()
    out = work / f"arm-{name}.json"
    try:
        cmd = [sys.executable, __file__, "--one", str(procs), "--broker", broker.url,
               "--state-parent", state, "--out", str(out),
               *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("devices", "rounds", "codec", "downlink", "model", "width", "epochs", "lr",
                  "min_samples")]]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        broker.stop()
    return json.loads(out.read_text())


def to_markdown(res: dict) -> str:
    lines = [f"# Fleet scale: {res['devices']} devices, each its own MQTT client\n",
             f"Machine: {res['machine']}, shared with other jobs (load averages below). "
             f"Command: `{res['command']}`\n",
             f"Task: MNIST-1D, {res['config']}.\n",
             "| devices | procs | aggregator state | round s (median) | round 1 s | "
             "aggregator CPU s/round | aggregator peak RSS MB | broker in B/s | "
             "broker out B/s | broker msgs in/out per s | fedge frames B/s | "
             "uplink B/round | downlink B/round | accuracy | load 1-min before/after |",
             "|" + "---|" * 15]
    for a in res["arms"]:
        m = a["medians"]
        lines.append(
            f"| {a['devices']} | {a['procs']} | {a['state']} | {m['seconds']} | "
            f"{a['round_1_seconds']} | {m['aggregator_cpu_seconds']} | "
            f"{a['fleet']['aggregator_peak_rss_mb']} | {_num(m['broker_bytes_received_per_s'])} | "
            f"{_num(m['broker_bytes_sent_per_s'])} | {_num(m['broker_messages_received_per_s'])}"
            f" / {_num(m['broker_messages_sent_per_s'])} | {_num(m['frame_bytes_per_s'])} | "
            f"{_num(m['uplink_bytes'])} | {_num(m['downlink_bytes'])} | "
            f"{a['final_accuracy']:.3f} | {a['load_before'][0]} / {a['load_after'][0]} |")
    return "\n".join(lines) + "\n" + res.get("notes", "")


def _num(x) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--procs", default="4,8", help="comma list: one arm each (>= 4 for "
                    "1,000 devices: MAX_CLIENTS_PER_PROCESS)")
    ap.add_argument("--codec", default="fedmrn")
    ap.add_argument("--downlink", default="fedmrn")
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--min-samples", type=int, default=2)
    ap.add_argument("--tmpfs-procs", default="",
                    help="comma list: arms again with the aggregator's state on /dev/shm")
    ap.add_argument("--json", default="runs/bench_fleet.json")
    ap.add_argument("--md")
    ap.add_argument("--notes", default="", help="a markdown file appended to the table")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--broker", help=argparse.SUPPRESS)
    ap.add_argument("--state-parent", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        Path(args.out).write_text(json.dumps(run_arm(args)))
        return
    plan = [(int(p), "") for p in args.procs.split(",") if p] + \
        [(int(p), "/dev/shm") for p in args.tmpfs_procs.split(",") if p]
    arms = []
    with tempfile.TemporaryDirectory(prefix="fedge-bench-fleet-") as work:
        for procs, state in plan:
            print(f"{args.devices} devices, {procs} procs, state {state or 'tmp'}", flush=True)
            arms.append(spawn(procs, state, args, Path(work)))
    res = {"machine": machine(), "devices": args.devices, "command": command("bench/fleet.py"),
           "config": f"{args.model} width {args.width}, {args.codec} uplink, {args.downlink} "
                     f"downlink, fedavg, {args.epochs} local epochs, lr {args.lr}, "
                     f"{args.rounds} rounds, Dirichlet 0.5 with >= {args.min_samples} "
                     "samples per device",
           "notes": Path(args.notes).read_text() if args.notes else "", "arms": arms}
    write_results(res, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
