"""``fedge simulate``: compare strategies and codecs on a simulated fleet."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from toolkit.cli import model_cmds, strategy_args
from toolkit.cli.field_cmds import downlink_arg, guard_args, train_args
from toolkit.sim.server_time import DEFAULT_SERVER_GFLOPS


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="a whole fleet in one process (in-memory "
                       "transport, or --broker [--procs K]), with real frames and per-device "
                       "figures")
    p.add_argument("--dataset", default="mnist1d",
                   help="mnist1d, mnist1d:N (N samples), digits or a .npz file")
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    strategy_args.name_args(p)
    p.add_argument("--profiles", default="rpi3b,rpi4,rpi5,jetson-orin-nano",
                   help="comma list, dealt round-robin over the devices")
    p.add_argument("--profiles-file")
    p.add_argument("--model", default="cnn")
    p.add_argument("--width", type=float, default=1.0)
    train_args(p)
    downlink_arg(p)
    guard_args(p)
    p.add_argument("--broker", help="mqtt://host:port (default: in-memory transport)")
    p.add_argument("--procs", type=int, default=1,
                   help="with --broker: run the devices, one MQTT client each, in this many "
                   "processes (the aggregator alone in the main one; its CPU, memory and "
                   "the broker's throughput are reported per round)")
    p.add_argument("--job", help="the job id (default: sim-<seed>-<random>)")
    p.add_argument("--keys-out", metavar="DIR", help="write the run's public keys "
                   "(server.pub, registry.json) here, for fedge dashboard --trust/--registry")
    p.add_argument("--min-samples", type=int, default=10,
                   help="per device; shards left shorter by the Dirichlet draw are topped up")
    strategy_args.add(p)
    p.add_argument("--attack", default="", metavar="KIND:COUNT[:SCALE]",
                   help="the first COUNT devices attack: replace, signflip, noise, lie or "
                   "labelflip (toolkit/sim/attackers.py); absent: they never join")
    p.add_argument("--export", help="write the final model's artifacts for the fleet here "
                   "(after the --json report is written)")
    model_cmds.strict_int8_arg(p)
    model_cmds.signing_key_arg(p)
    p.add_argument("--server-gflops", type=float, default=DEFAULT_SERVER_GFLOPS,
                   metavar="GFLOPS", help="the stated server's sustained fp32 GFLOP/s: the "
                   "server's counted FLOPs at this rate are its part of the simulated time "
                   "(default: %(default)s; its measured seconds here are reported too)")
    p.add_argument("--json", required=True)
    p.set_defaults(func=simulate)


def simulate(args: argparse.Namespace) -> int:
    from broker_server.downlink import check_downlink
    from device_runtime import codecs
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.console import RoundProgress
    from toolkit.sim.simulate import SimOptions, check_options, run_simulation
    from toolkit.strategies.setups import check_strategy

    check_options(SimOptions(devices=args.devices, rounds=args.rounds, broker=args.broker,
                             procs=args.procs, min_samples=args.min_samples,
                             attack=args.attack, server_gflops=args.server_gflops))
    check_strategy(args.strategy)
    codecs.get(args.codec)
    check_downlink(args.downlink, args.strategy)
    cat = ProfileCatalogue.load(args.profiles_file)
    profiles = [p.name for p in cat.select(args.profiles)]
    options = strategy_args.options(args, cat, profiles, args.devices)
    if getattr(options, "dp_seed", 0) is None:
        # Same seed, same run: the DP noise too (fedge serve keeps OS entropy there,
        # as noise anyone can regenerate protects nothing).
        options = replace(options, dp_seed=args.seed)
    opts = SimOptions(args.dataset, args.devices, args.rounds, args.alpha, args.seed,
                      args.strategy, args.codec, args.model, args.width, tuple(profiles),
                      args.epochs, args.batch_size, args.lr, broker=args.broker,
                      procs=args.procs, min_samples=args.min_samples,
                      downlink=args.downlink, attack=args.attack,
                      norm_bound=args.norm_bound, max_samples=args.max_samples,
                      job=args.job, keys_out=args.keys_out, server_gflops=args.server_gflops,
                      strategy_options=options)

    from toolkit.strategies.robust import round_note

    def fleet(rec: dict) -> str:
        agg = (f"aggregator {rec['aggregator_cpu_seconds']:.2f} CPU s, "
               f"{rec['aggregator_rss_mb']:.0f} MB") if "aggregator_cpu_seconds" in rec else ""
        return "  ".join(filter(None, (agg, round_note(rec))))
    key = model_cmds.signing_key(args) if args.export else None  # before the long part
    with RoundProgress(args.rounds, sys.stderr, "simulate", fleet) as show:
        report, ckpt = run_simulation(opts, show, cat)
    # The report first: an export that fails (say --strict-int8) must not lose the run.
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"final accuracy {report['final_accuracy']:.4f}; uplink "
          f"{report['uplink_bytes_total']:,} B, downlink {report['downlink_bytes_total']:,} B; "
          f"wrote {args.json}", flush=True)
    if report.get("fleet", {}).get("broker_note"):
        print(report["fleet"]["broker_note"], flush=True)
    if args.export:
        from device_runtime.manifest import load_manifest
        from toolkit.planning.fleet import ExportOptions, export_fleet

        path = export_fleet(ckpt, cat.select(args.profiles), args.export, None,
                            ExportOptions(signing_key=key.path, strict_int8=args.strict_int8))
        model_cmds.int8_warnings(load_manifest(path))
        report["export"] = str(path)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {path}")
    return 0
