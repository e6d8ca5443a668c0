"""Benchmark fedge against Flower on the same MNIST-1D non-IID task.

Same partition (fedge's public split + Dirichlet 0.5), same model (the zoo cnn),
same initial weights, same local training (fedge's ``train_local``: SGD, lr 0.02,
momentum 0.9, batch 32, 2 epochs, the round's seed), same rounds and seeds.

Arms, each seed in its own process (server and all clients in that process):
- ``flower-fedavg``: Flower's ``FedAvg`` + ``NumPyClient``s over Flower's gRPC
  transport on localhost (``flwr.compat`` ``start_server`` / ``start_client``, the
  clients in threads). Runs under ``--flower-python`` (a venv with flwr); skipped
  with a note when flwr is not importable there.
- ``fedge-fp32``: fedge's aggregator and device agents, FedAvg fp32, over a real
  Mosquitto (``MqttTransport``).
- ``fedge-fedmrn``: the same with the fedmrn codec (1-bit masks; best low-traffic
  codec of docs/results/compression.md).

    OMP_NUM_THREADS=1 python bench/vs_flower.py --seeds 0,1,2 \\
        --json docs/results/vs_flower.json --md docs/results/vs_flower.md
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command, machine, write_results  # noqa: E402

# fedge-<uplink codec>[+<downlink codec>]
ARMS = ("flower-fedavg", "fedge-fp32", "fedge-fedmrn", "fedge-fedmrn+fedmrn")
EPOCHS, BATCH, LR, ALPHA, PUBLIC = 2, 32, 0.02, 0.5, 0.1


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def task(seed: int, devices: int, model: str):
    """The data, shards, model config and initial model exactly as fedge simulate builds them."""
    import torch

    from toolkit.model import datasets, zoo
    from toolkit.model.partition import dirichlet_split, public_split

    ds = datasets.load("mnist1d")
    pub, rest = public_split(len(ds.y_train), PUBLIC, seed)
    parts = dirichlet_split(ds.y_train[rest], devices, ALPHA, seed)
    cfg = zoo.make_config(model, ds.sample_shape, ds.num_classes, 1.0,
                          float(np.mean(ds.x_train[pub])), float(np.std(ds.x_train[pub])))
    torch.manual_seed(seed)
    shards = [(ds.x_train[rest[p]], ds.y_train[rest[p]]) for p in parts]
    return ds, shards, cfg, zoo.build_model(cfg)


def median_delta(stamps: list[float]) -> float:
    d = [b - a for a, b in zip(stamps, stamps[1:])]
    return round(statistics.median(d), 3) if d else 0.0


def run_fedge(codec: str, seed: int, devices: int, rounds: int, model: str,
              broker: str, downlink: str = "fp32") -> dict:
    """One fedge run over the broker; bytes are the frames fedge published."""
    from toolkit.sim.simulate import SimOptions, run_simulation

    stamps = [time.time()]
    report, _ = run_simulation(SimOptions(
        devices=devices, rounds=rounds, alpha=ALPHA, seed=seed, codec=codec, model=model,
        epochs=EPOCHS, batch_size=BATCH, lr=LR, public_fraction=PUBLIC, broker=broker,
        downlink=downlink),
        on_round=lambda rec: stamps.append(time.time()))
    rr = report["rounds"]
    return {"accuracy": [r["accuracy"] for r in rr], "final_accuracy": report["final_accuracy"],
            "up_bytes_per_round": statistics.median(r["uplink_bytes"] for r in rr),
            "down_bytes_per_round": statistics.median(r["downlink_bytes"] for r in rr),
            "bytes_total": sum(r["uplink_bytes"] + r["downlink_bytes"] for r in rr),
            "seconds_per_round": median_delta(stamps), "peak_rss_mb": peak_rss_mb()}


def flower_client(shard, cfg, seed: int):
    """A NumPyClient that trains with fedge's own local training function."""
    import flwr

    from device_runtime.training.local import (LocalTrainOptions, load_weights, train_local,
                                               weights_of)
    from toolkit.model import zoo

    model = zoo.build_model(cfg)
    keys = list(weights_of(model))

    class Client(flwr.client.NumPyClient):
        def fit(self, parameters, config):
            load_weights(model, dict(zip(keys, parameters)))
            rnd = int(config["server_round"])
            opts = LocalTrainOptions(EPOCHS, BATCH, LR, seed=seed * 100_003 + rnd)
            res = train_local(model, shard[0], shard[1], opts)
            return [res.weights[k] for k in keys], res.samples, {}

    return Client().to_client()


def flower_strategy(model, ds, devices: int, counts: dict, stamps: list):
    """FedAvg over all clients, server-side test accuracy, parameter bytes counted."""
    import flwr
    from flwr.server.strategy import FedAvg

    from device_runtime.training.local import load_weights, weights_of
    from toolkit.model.train import accuracy

    keys = list(weights_of(model))

    def evaluate(rnd, params, config):
        load_weights(model, dict(zip(keys, params)))
        counts["accuracy"].append(round(accuracy(model, ds.x_test, ds.y_test), 4))
        stamps.append(time.time())
        return 0.0, {"accuracy": counts["accuracy"][-1]}

    class Counting(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            cfg = super().configure_fit(server_round, parameters, client_manager)
            counts["down"].append(sum(len(t) for _, ins in cfg for t in ins.parameters.tensors))
            return cfg

        def aggregate_fit(self, server_round, results, failures):
            counts["up"].append(sum(len(t) for _, r in results for t in r.parameters.tensors))
            return super().aggregate_fit(server_round, results, failures)

    init = flwr.common.ndarrays_to_parameters([v for v in weights_of(model).values()])
    return Counting(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=devices,
                    min_available_clients=devices, initial_parameters=init,
                    evaluate_fn=evaluate,
                    on_fit_config_fn=lambda rnd: {"server_round": rnd})


def run_flower(seed: int, devices: int, rounds: int, model_name: str) -> dict:
    """One Flower run: server in this thread, clients in threads, gRPC on localhost."""
    import flwr
    from flwr.compat.client.app import start_client
    from flwr.compat.server.app import start_server

    from broker_server.embedded import free_port

    ds, shards, cfg, model = task(seed, devices, model_name)
    counts: dict = {"up": [], "down": [], "accuracy": []}
    stamps: list[float] = []
    strategy = flower_strategy(model, ds, devices, counts, stamps)
    addr = f"127.0.0.1:{free_port()}"
    threads = [threading.Thread(target=_client_loop, daemon=True,
                                args=(start_client, addr, flower_client(s, cfg, seed)))
               for s in shards]
    for th in threads:
        th.start()
    start_server(server_address=addr, strategy=strategy,
                 config=flwr.server.ServerConfig(num_rounds=rounds))
    acc = counts["accuracy"][1:]  # [0] is the initial model
    return {"accuracy": acc, "final_accuracy": acc[-1],
            "up_bytes_per_round": statistics.median(counts["up"]),
            "down_bytes_per_round": statistics.median(counts["down"]),
            "bytes_total": sum(counts["up"]) + sum(counts["down"]),
            "seconds_per_round": median_delta(stamps), "peak_rss_mb": peak_rss_mb(),
            "flwr_version": flwr.__version__}


def _client_loop(start_client, addr: str, client) -> None:
    time.sleep(1.0)  # let the server bind first
    start_client(server_address=addr, client=client, insecure=True)


def flower_available(python: str) -> str | None:
    """flwr's version under ``python``, or None when it is not importable there."""
    out = subprocess.run([python, "-c", "import flwr; print(flwr.__version__)"],
                         capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def run_child(args: argparse.Namespace) -> dict:
    """The body of one ``--one ARM --seed S`` process."""
    if args.one == "flower-fedavg":
        return run_flower(args.seed, args.devices, args.rounds, args.model)
    codec, _, downlink = args.one.split("-", 1)[1].partition("+")
    return run_fedge(codec, args.seed, args.devices, args.rounds, args.model, args.broker,
                     downlink or "fp32")


def spawn(arm: str, seed: int, args: argparse.Namespace, python: str, broker: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [python, str(Path(__file__).resolve()), "--one", arm, "--seed", str(seed),
               "--devices", str(args.devices), "--rounds", str(args.rounds),
               "--model", args.model, "--broker", broker, "--out", out.name]
        t0 = time.time()
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
            raise SystemExit(f"{arm} seed {seed} failed ({done.returncode})")
        res = json.loads(Path(out.name).read_text())
    res.update(seed=seed, wall_seconds=round(time.time() - t0, 1))
    print(f"  {arm} seed {seed}: final {res['final_accuracy']:.4f}, "
          f"{(res['up_bytes_per_round'] + res['down_bytes_per_round']) / 1e6:.3f} MB/round, "
          f"{res['seconds_per_round']} s/round, {res['peak_rss_mb']} MB RSS, load "
          f"{os.getloadavg()[0]:.2f}", flush=True)
    return res


def spread(xs: list[float]) -> float:
    return round((max(xs) - min(xs)) / 2, 4)


def summarize(runs: dict) -> dict:
    out = {}
    for arm, rs in runs.items():
        finals = [r["final_accuracy"] for r in rs]
        up = statistics.median(r["up_bytes_per_round"] for r in rs)
        down = statistics.median(r["down_bytes_per_round"] for r in rs)
        out[arm] = {"final_median": round(statistics.median(finals), 4),
                    "final_spread": spread(finals), "up_bytes": up, "down_bytes": down,
                    "mb_per_round": round((up + down) / 1e6, 4),
                    # every round's bytes / rounds: includes round 1's whole model
                    "bytes_total": statistics.median(r["bytes_total"] for r in rs),
                    "s_per_round": round(statistics.median(r["seconds_per_round"]
                                                           for r in rs), 3),
                    "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in rs), 1)}
    fl = out.get("flower-fedavg")
    for arm, s in out.items():
        if fl:
            s["flower_over_arm_total"] = round((fl["up_bytes"] + fl["down_bytes"])
                                               / (s["up_bytes"] + s["down_bytes"]), 2)
            s["flower_over_arm_uplink"] = round(fl["up_bytes"] / s["up_bytes"], 2)
            s["flower_over_arm_all_rounds"] = round(fl["bytes_total"] / s["bytes_total"], 2)
            s["points_below_flower"] = round(100 * (fl["final_median"] - s["final_median"]), 2)
            s["s_per_round_over_flower"] = paired(runs[arm], runs["flower-fedavg"])
    return out


def paired(arm: list[dict], flower: list[dict]) -> dict:
    """This arm's seconds per round over Flower's, seed by seed (each pair ran back to
    back), and their median."""
    fl = {r["seed"]: r["seconds_per_round"] for r in flower}
    ratios = [round(r["seconds_per_round"] / fl[r["seed"]], 3) for r in arm
              if fl.get(r["seed"])]
    return {"per_seed": ratios, "median": round(statistics.median(ratios), 3) if ratios else None}


def _paired(s: dict) -> str:
    p = s.get("s_per_round_over_flower")
    if not p or p["median"] is None:
        return "-"
    return f"{p['median']}x ({', '.join(f'{x}x' for x in p['per_seed'])})"


def _ratio(s: dict, key: str) -> str:
    return f"{s[key]}x" if key in s else "-"


def to_markdown(res: dict) -> str:
    lines = ["# fedge against Flower: MNIST-1D, Dirichlet 0.5\n",
             f"{res['devices']} devices, {res['rounds']} rounds, {EPOCHS} local epochs "
             f"(SGD lr {LR}, momentum 0.9, batch {BATCH}), model {res['model']}, seeds "
             f"{res['seeds']}; machine {res['machine']}, load average at the end "
             f"{res.get('load_end', '-')}; flwr {res['flwr'] or 'not installed'}. "
             f"Command: `{res['command']}`.\n",
             "Medians over seeds; accuracy ± half the range. Bytes per round are summed "
             "over all devices; the per-round columns are the median round (a round after "
             "the first), \"all rounds\" divides every byte of the run, round 1's whole "
             "model included, by the rounds. Arm `fedge-A+B`: uplink codec A, downlink "
             "codec B (default fp32: the whole model every round).\n",
             "| system / arm | final accuracy | points below Flower | MB / round (up + down) "
             "| up MB | down MB | Flower / arm (per round) | Flower / arm (uplink) "
             "| Flower / arm (all rounds) | s / round | s / round over Flower's (same seed) "
             "| peak RSS MB (server + clients, one process) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in res["summary"].items():
        lines.append(f"| {arm} | {s['final_median']:.4f} ± {s['final_spread']:.4f} "
                     f"| {s.get('points_below_flower', '-')} | {s['mb_per_round']:.3f} "
                     f"| {s['up_bytes'] / 1e6:.3f} | {s['down_bytes'] / 1e6:.3f} "
                     f"| {_ratio(s, 'flower_over_arm_total')} "
                     f"| {_ratio(s, 'flower_over_arm_uplink')} "
                     f"| {_ratio(s, 'flower_over_arm_all_rounds')} | {s['s_per_round']} "
                     f"| {_paired(s)} | {s['peak_rss_mb']} |")
    if res.get("note"):
        lines.append(f"\n{res['note']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--flower-python", default="/tmp/flwrenv/bin/python")
    ap.add_argument("--json", default="runs/bench_vs_flower.json")
    ap.add_argument("--md")
    ap.add_argument("--one", choices=ARMS, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--broker", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        Path(args.out).write_text(json.dumps(run_child(args)))
        return
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    from testkit.brokers import Mosquitto

    seeds = [int(s) for s in args.seeds.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    fpy = args.flower_python if Path(args.flower_python).exists() else sys.executable
    flwr_version, note = flower_available(fpy), ""
    if "flower-fedavg" in arms and flwr_version is None:
        arms.remove("flower-fedavg")
        note = (f"Flower arm skipped: flwr is not importable by {fpy} (install it in a "
                "separate venv, see the module docstring).")
        print(note, flush=True)
    runs: dict = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory() as work:
        broker = Mosquitto(Path(work)).start()
        try:
            # Seed by seed, the arms back to back: a shared machine's speed drifts over
            # minutes, so each arm's seconds are compared with Flower's of the same seed,
            # measured next to them (``paired``).
            for s in seeds:
                for arm in arms:
                    py = fpy if arm == "flower-fedavg" else sys.executable
                    runs[arm].append(spawn(arm, s, args, py, broker.url))
        finally:
            broker.stop()
    res = {"machine": machine(), "load_end": [round(x, 2) for x in os.getloadavg()],
           "seeds": seeds, "devices": args.devices,
           "rounds": args.rounds, "model": args.model, "flwr": flwr_version, "note": note,
           "command": command("bench/vs_flower.py"), "runs": runs,
           "summary": summarize(runs)}
    write_results(res, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
