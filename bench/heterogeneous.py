"""Benchmark heterogeneous model sizes on MNIST-1D non-IID with a mixed fleet.

One width budget per profile
(``toolkit.strategies.server.splitmix.budgets_from_profiles``: the width of the single
network the profile's compute affords next to the strongest) drives every
arm, so each arm asks the same of each device:

- ``splitmix``: a device trains budget / (1/8) bases; accuracy for k = 1..8 bases;
- ``splitmix-paper``: the same as the authors' code runs it (``SplitMixOptions.paper()``:
  their width tricks, BatchNorm on batch statistics, bases reshuffled each cycle);
- ``heterofl``: nested widths, the device's budget snapped to 1/8 steps;
- ``reft`` / ``reft-logits``: the global model pruned per profile to the MACs of
  that width, distilled on the server's public split (weights or logits uplink);
- ``reft-average-only`` / ``reft-distill-only``: the ablation of fedge's REFT (the
  clients' weights averaged back into place, no distillation; distillation alone);
- ``reft-paper``: REFT as described (``REFTOptions.paper()``: one-shot pruning,
  distillation alone);
- ``fedavg-capable``: FedAvg at full width, only the devices whose budget is 1;
- ``fedavg-common``: FedAvg at the weakest budget's width, every device;
- ``fedavg-full``: FedAvg at full width on every device, ignoring budgets (reference).

Per arm: final accuracy (mean and spread over seeds), per profile the MACs each
device trained, its uplink bytes per round and simulated round time. Also the
time a loaded SplitMix ``Predictor`` takes to switch size (median of many
switches) and the check that k bases output the mean of their logits.

    python bench/heterogeneous.py --seeds 0,1,2 --json docs/results/heterogeneous.json \\
        --md docs/results/heterogeneous.md
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (command, machine, passive_waits, provenance,  # noqa: E402
                          this_run, threads_arg, use_threads, write_results)

passive_waits()  # before torch loads (below)

from broker_server.strategies import FedAvgOptions, HeteroFLOptions, SplitMixOptions  # noqa: E402
from toolkit.strategies.server.heterofl import common_width, full_width_profiles, snap_width  # noqa: E402
from toolkit.strategies.server.reft import REFTOptions  # noqa: E402
from toolkit.sim.simulate import SimOptions, run_simulation  # noqa: E402

PROFILES = ("rpi4", "jetson-nano", "jetson-orin-nano")


def budgets(profiles: tuple[str, ...]) -> dict[str, float]:
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.strategies.server.splitmix import budgets_from_profiles

    cat = ProfileCatalogue.load()
    return budgets_from_profiles([cat.get(p) for p in profiles], 0.125)


def mac_fractions(budget: dict[str, float], model: str) -> dict[str, float]:
    """Per profile, the MAC share of the width its budget snaps to (REFT's pruning target)."""
    from toolkit.model import datasets, zoo
    from toolkit.model.checkpoint import example_input
    from toolkit.model.pruning import count_macs

    ds = datasets.load("mnist1d")

    def macs(w: float) -> int:
        cfg = zoo.make_config(model, ds.sample_shape, ds.num_classes, w)
        return count_macs(zoo.build_model(cfg), example_input(cfg))[0]
    full = macs(1.0)
    return {p: round(macs(snap_width(b, 0.125)) / full, 6) for p, b in budget.items()}


def arms(devices: int, rounds: int, model: str, profiles: tuple[str, ...]) -> dict:
    b = budgets(profiles)
    fr = mac_fractions(b, model)
    base = SimOptions(devices=devices, rounds=rounds, alpha=0.5, profiles=profiles,
                      model=model)
    return {
        "splitmix": replace(base, strategy="splitmix",
                            strategy_options=SplitMixOptions(budget_by_profile=b)),
        "splitmix-paper": replace(base, strategy="splitmix", strategy_options=replace(
            SplitMixOptions.paper(), budget_by_profile=b)),
        "heterofl": replace(base, strategy="heterofl",
                            strategy_options=HeteroFLOptions(width_by_profile=b)),
        "reft": replace(base, strategy="reft", strategy_options=REFTOptions(fractions=fr)),
        "reft-logits": replace(base, strategy="reft",
                               strategy_options=REFTOptions(fractions=fr, uplink="logits")),
        "reft-average-only": replace(base, strategy="reft", strategy_options=REFTOptions(
            fractions=fr, distill_epochs=0)),
        "reft-distill-only": replace(base, strategy="reft", strategy_options=REFTOptions(
            fractions=fr, average_first=False)),
        "reft-paper": replace(base, strategy="reft", strategy_options=replace(
            REFTOptions.paper(), fractions=fr)),
        "fedavg-capable": replace(base, strategy_options=FedAvgOptions(full_width_profiles(b))),
        "fedavg-common": replace(base, width=common_width(b)),
        "fedavg-full": base,
    }


def run_arm(name: str, opts: SimOptions, seeds: list[int], switch: dict) -> list[dict]:
    runs = []
    for s in seeds:
        t0 = time.time()
        report, ckpt = run_simulation(replace(opts, seed=s))
        devs = report["devices"]
        runs.append({"seed": s, "accuracy": [r["accuracy"] for r in report["rounds"]],
                     "final_accuracy": report["final_accuracy"],
                     "width_accuracy": report.get("width_accuracy"),
                     "simulated_seconds": report["rounds"][-1]["simulated_elapsed"],
                     "profiles": per_profile(devs), "seconds": round(time.time() - t0, 1)})
        print(f"  {name} seed {s}: final {report['final_accuracy']:.4f} "
              f"({runs[-1]['seconds']} s)", flush=True)
        if name == "splitmix" and not switch:
            switch.update(predictor_switch(ckpt, opts.profiles[0]))
    return runs


def per_profile(devs: list[dict]) -> dict:
    out = {}
    for p in dict.fromkeys(d["profile"] for d in devs):
        mine = [d for d in devs if d["profile"] == p]
        trained = [d for d in mine if d["rounds_trained"]]
        out[p] = {"devices": len(mine), "macs": mine[0]["macs"],
                  "uplink_bytes_per_round": round(statistics.mean(
                      d["uplink_bytes"] / d["rounds_trained"] for d in trained)) if trained else 0,
                  "simulated_round_seconds": round(statistics.mean(
                      d["simulated_round_seconds"] for d in mine), 4)}
    return out


def predictor_switch(ckpt, profile: str, switches: int = 2000) -> dict:
    """Export the bases, load a Predictor once, then time ``set_budget`` switches."""
    from device_runtime.predictor import Predictor
    from device_runtime.session import run
    from toolkit.model import datasets
    from toolkit.planning.fleet import ExportOptions, export_fleet
    from toolkit.planning.profiles import ProfileCatalogue

    ds = datasets.load("mnist1d")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = export_fleet(ckpt, [ProfileCatalogue.load().get(profile)], Path(tmp) / "x",
                                ds, ExportOptions(int8=False))
        pred = Predictor.from_manifest(manifest, profile)
        m = len(pred.sessions)
        times = []
        for i in range(switches):
            t0 = time.perf_counter_ns()
            pred.set_budget(bases=1 + i % m)
            times.append(time.perf_counter_ns() - t0)
        ms_times = []
        for i in range(switches // 4):
            t0 = time.perf_counter_ns()
            pred.set_budget(ms=sum(pred.base_ms[:1 + i % m]))
            ms_times.append(time.perf_counter_ns() - t0)
        x = ds.x_test[:256]
        each = [run(s, x) for s in pred.sessions]
        diffs = []
        for k in range(1, m + 1):
            pred.set_budget(bases=k)
            diffs.append(float(np.max(np.abs(pred.predict_logits(x) - np.mean(each[:k], 0)))))
    return {"profile": profile, "bases": m, "switches": switches,
            "set_budget_bases_median_us": round(statistics.median(times) / 1e3, 2),
            "set_budget_ms_median_us": round(statistics.median(ms_times) / 1e3, 2),
            "max_abs_diff_vs_mean_of_bases": max(diffs),
            "base_ms": [round(v, 4) for v in pred.base_ms]}


def summarize(results: dict) -> dict:
    out = {}
    for name, runs in results.items():
        finals = [r["final_accuracy"] for r in runs]
        s = {"final_mean": round(statistics.mean(finals), 4),
             "final_std": round(statistics.pstdev(finals), 4),
             "simulated_seconds": round(statistics.mean(r["simulated_seconds"] for r in runs), 1),
             "profiles": runs[0]["profiles"]}
        if runs[0]["width_accuracy"]:
            ks = runs[0]["width_accuracy"]
            s["width_accuracy"] = {k: round(statistics.mean(r["width_accuracy"][k] for r in runs),
                                            4) for k in ks}
        out[name] = s
    return out


def to_markdown(res: dict) -> str:
    lines = ["# Heterogeneous fleet: MNIST-1D, Dirichlet 0.5\n",
             f"{res['devices']} devices ({', '.join(res['profiles'])}, dealt round-robin), "
             f"model {res['model']}, {res['rounds']} rounds, seeds {res['seeds']}; width "
             f"budgets {res['budgets']}; machine {res['machine']}. Commands: "
             + "; ".join(f"`{c}`" for c in _list(res["command"])) + ".\n",
             "| arm | final accuracy (mean ± sd) | simulated time (s) | "
             + " | ".join(f"{p}: MACs / uplink B per round / round s" for p in res["profiles"])
             + " |", "|---|---|---|" + "---|" * len(res["profiles"])]
    for name, s in res["summary"].items():
        cells = [f"{q['macs']:,} / {q['uplink_bytes_per_round']:,} / "
                 f"{q['simulated_round_seconds']:.3g}" for q in s["profiles"].values()]
        lines.append(f"| {name} | {s['final_mean']:.4f} ± {s['final_std']:.4f} | "
                     f"{s['simulated_seconds']} | " + " | ".join(cells) + " |")
    wa = res["summary"].get("splitmix", {}).get("width_accuracy")
    if wa:
        lines += ["\nSplitMix accuracy with the first k bases (mean over seeds):\n",
                  "| k | " + " | ".join(wa) + " |", "|---|" + "---|" * len(wa),
                  "| accuracy | " + " | ".join(f"{v:.4f}" for v in wa.values()) + " |"]
    if res.get("predictor_switch"):
        p = res["predictor_switch"]
        lines += [f"\nPredictor size switch on a loaded {p['profile']} predictor "
                  f"({p['bases']} bases, {p['switches']} switches): `set_budget(bases=k)` "
                  f"median {p['set_budget_bases_median_us']} µs, `set_budget(ms=X)` median "
                  f"{p['set_budget_ms_median_us']} µs; k bases against the mean of those "
                  f"bases' logits: max |diff| {p['max_abs_diff_vs_mean_of_bases']:.2e}."]
    return "\n".join(lines) + "\n"


def _list(x) -> list:
    return x if isinstance(x, list) else [x]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--devices", type=int, default=9)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--model", default="cnn")
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--arms", help="comma list (default: all)")
    ap.add_argument("--json", default="runs/bench_heterogeneous.json")
    ap.add_argument("--md")
    ap.add_argument("--merge", action="store_true", help="keep the other arms' runs from "
                    "--json (same seeds, devices, rounds and model) and rerun only --arms")
    threads_arg(ap)
    args = ap.parse_args()
    use_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    profiles = tuple(args.profiles.split(","))
    chosen = arms(args.devices, args.rounds, args.model, profiles)
    if args.arms:
        chosen = {k: v for k, v in chosen.items() if k in set(args.arms.split(","))}
    res = {"machine": machine(), "seeds": seeds, "devices": args.devices, "model": args.model,
           "rounds": args.rounds, "profiles": list(profiles), "budgets": budgets(profiles),
           "command": command("bench/heterogeneous.py"), "runs": {}, "predictor_switch": {}}
    if args.merge:
        res = merged(res, args.json)
    for name, opts in chosen.items():
        print(name, flush=True)
        res["runs"][name] = run_arm(name, opts, seeds, res["predictor_switch"])
    res["summary"] = summarize(res["runs"])
    write_results(res, args.json, args.md, to_markdown)


def merged(res: dict, path: str) -> dict:
    """``res`` with the runs (and commands) of an earlier result of the same setup."""
    import json

    old = json.loads(Path(path).read_text())
    for key in ("seeds", "devices", "rounds", "model", "profiles"):
        if old.get(key) != res[key]:
            sys.exit(f"--merge: {path} has {key} {old.get(key)!r}, this run {res[key]!r}")
    commands = old["command"] if isinstance(old["command"], list) else [old["command"]]
    return {**res, "runs": old["runs"], "predictor_switch": old.get("predictor_switch", {}),
            "command": [*commands, res["command"]], **provenance([old, this_run()])}


if __name__ == "__main__":
    main()
