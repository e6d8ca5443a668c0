"""What FedMRN's mask training costs next to plain local training, per epoch.

For each architecture, the same shard of MNIST-1D, the same minibatches and one torch
thread (as a device in the simulator trains): plain SGD (FedAvg's client update,
``train_local``) and FedMRN's masked training (``train_fedmrn``: progressive
stochastic masking, the straight-through estimator, the final sampled mask), run in
turns (``--reps`` times each, interleaved, so that a loaded machine slows both
alike), each from the same freshly built model. Reported: median seconds per epoch of
each and their ratio; the setup and the final mask are inside FedMRN's time, as a
device pays them every round.

    python bench/local_train.py --json docs/results/local_train.json \\
        --md docs/results/local_train.md [--before OLD.json]

``--before``: this bench's JSON from an older commit (run from a detached worktree
beside this one), shown in the table as its own rows.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command, machine, write_results  # noqa: E402


def one(arch: str, kind: str, x, y, epochs: int, batch: int) -> float:
    """Seconds per epoch of one local training run from a fresh model."""
    import torch

    from device_runtime.training.fedmrn import train_fedmrn
    from device_runtime.training.local import LocalTrainOptions, train_local
    from device_runtime.training.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, tuple(x.shape[1:]), 10))
    opts = LocalTrainOptions(epochs=epochs, batch_size=batch, seed=1)
    t0 = time.perf_counter()
    if kind == "plain":
        train_local(model, x, y, opts)
    else:
        train_fedmrn(model, x, y, opts, seed=7, device="dev-0")
    return (time.perf_counter() - t0) / epochs


def run(args) -> dict:
    import torch

    from toolkit.model.datasets import load_mnist1d

    torch.set_num_threads(1)
    ds = load_mnist1d(0)
    x, y = ds.x_train[:args.samples], ds.y_train[:args.samples]
    rows = []
    for arch in args.archs.split(","):
        times: dict[str, list[float]] = {"plain": [], "fedmrn": []}
        for kind in times:  # warm-up: first-call allocations, lazy imports
            one(arch, kind, x, y, 1, args.batch)
        for _ in range(args.reps):
            for kind in times:
                times[kind].append(one(arch, kind, x, y, args.epochs, args.batch))
        plain, mrn = (statistics.median(times[k]) for k in ("plain", "fedmrn"))
        rows.append({"arch": arch, "plain_s_per_epoch": plain, "fedmrn_s_per_epoch": mrn,
                     "ratio": mrn / plain, "runs": times})
        print(f"{arch}: plain {plain * 1e3:.1f} ms, fedmrn {mrn * 1e3:.1f} ms per epoch, "
              f"ratio {mrn / plain:.2f}", flush=True)
    return {"bench": "local_train", "machine": machine(), "command": command(__file__),
            "load": os.getloadavg(), "samples": len(x), "batch": args.batch,
            "epochs": args.epochs, "reps": args.reps, "rows": rows}


def to_markdown(res: dict) -> str:
    la = ", ".join(f"{v:.2f}" for v in res["load"])
    lines = ["# FedMRN mask training against plain local training, per epoch", "",
             f"MNIST-1D, {res['samples']} samples, batch {res['batch']}, "
             f"{res['epochs']} epochs a run, one torch thread; medians of {res['reps']} "
             f"interleaved runs each. Machine {res['machine']}; load average at the end "
             f"{la}; code {res.get('code', '?')}.", "",
             f"`{res['command']}`", "",
             "| code | model | plain ms/epoch | FedMRN ms/epoch | ratio |",
             "|---|---|---|---|---|"]
    runs = ([("before: " + res["before"]["code"], res["before"]["rows"])]
            if res.get("before") else []) + [(res.get("code", "?"), res["rows"])]
    for label, rows in runs:
        for r in rows:
            lines.append(f"| {label} | {r['arch']} | {r['plain_s_per_epoch'] * 1e3:.1f} | "
                         f"{r['fedmrn_s_per_epoch'] * 1e3:.1f} | {r['ratio']:.2f} |")
    if res.get("before"):
        b = res["before"]
        lines += ["", f"Before: `{b['command']}` at {b['code']}, load average "
                  f"{', '.join(f'{v:.2f}' for v in b['load'])} at its end, run just before "
                  f"this one."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default="cnn1d,cnn-wide")
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=2, help="per run (fedge's default)")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default="runs/bench_local_train.json")
    ap.add_argument("--md")
    ap.add_argument("--before", help="this bench's JSON from an older commit")
    args = ap.parse_args()
    res = run(args)
    if args.before:
        res["before"] = json.loads(Path(args.before).read_text())
    write_results(res, args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
