"""``fedge serve``, ``fedge device`` and ``fedge demo``: the field loop over MQTT."""
from __future__ import annotations

import argparse

from pathlib import Path

from toolkit.cli import strategy_args
from toolkit.cli.model_cmds import allow_arg


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the aggregator for a job")
    p.add_argument("--broker", help="mqtt://host:port (default: start the embedded broker)")
    p.add_argument("--job", required=True)
    p.add_argument("--checkpoint", required=True, help="initial model")
    strategy_args.name_args(p)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--min-devices", type=int, default=2, help="quorum per round")
    p.add_argument("--round-timeout", type=float, default=60.0, help="seconds")
    p.add_argument("--state-dir", required=True)
    downlink_arg(p)
    guard_args(p)
    p.add_argument("--json", help="write the report here")
    p.add_argument("--eval-data", help=".npz with x_test, y_test (default: the "
                   "checkpoint's dataset; with --eval-every and neither, no central test)")
    eval_args(p)
    p.add_argument("--root-data", help=".npz with labelled x, y the aggregator holds: "
                   "--robust zeno scores each update by the loss it removes there")
    p.add_argument("--profiles", default="all", help="the fleet's profiles (comma list or "
                   "all): they set SplitMix/HeteroFL budgets and REFT's pruning")
    p.add_argument("--profiles-file")
    train_args(p)
    strategy_args.add(p)
    p.add_argument("--max-payload", type=int, help="bytes per MQTT message (default: the "
                   "credentials' max_payload, else 131072)")
    aggregator_identity_args(p)
    p.add_argument("--workers", type=int, help="fold the updates in N worker processes "
                   "sharing the update topic ($share; needs --broker with shared "
                   "subscriptions: Mosquitto, EMQX, HiveMQ)")
    allow_arg(p)
    p.set_defaults(func=serve)
    _add_worker(sub)

    p = sub.add_parser("demo", help="the whole loop on one machine: 8 device processes, "
                       "an aggregator and a broker")
    p.add_argument("--broker", help="mqtt://host:port (default: the embedded broker)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.add_argument("--workdir", help="shards, state, keys, logs and (without --json) the "
                   "report go here (default: $FEDGE_HOME/demo; a demo clears its own)")
    p.add_argument("--json", help="report (a PNG plot goes beside; default: demo.json in "
                   "the work dir)")
    p.add_argument("--eval-every", type=int, default=5, help="the devices score the global "
                   "model on held-out data every K rounds (0: off)")
    from device_runtime import codecs

    p.add_argument("--codec", default="fedmrn", help="how updates travel: one of "
                   f"{', '.join(codecs.CODECS.names())} (default: fedmrn, 1 bit a weight)")
    p.add_argument("--downlink", default="int8", help="how the model reaches devices: fp32 "
                   "(whole) or a codec for the change (default: int8)")
    p.add_argument("--no-variants", action="store_true", help="skip exporting each "
                   "profile's variant of the final model at the end")
    train_args(p)
    p.set_defaults(func=demo)


def eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-every", type=int, default=0, help="every K rounds (and after the "
                   "last) the devices score the global model on a held-out part of their "
                   "data; the report gives the weighted mean, per profile and the spread")
    p.add_argument("--holdout", type=float, default=0.2, help="with --eval-every: the part "
                   "of each device's data it holds out (never trains on)")


def downlink_arg(p: argparse.ArgumentParser) -> None:
    from broker_server.downlink import downlink_codecs

    coded = ", ".join(downlink_codecs()[1:])  # the names check_downlink accepts
    p.add_argument("--downlink", default="fp32", help="how the model reaches devices each "
                   f"round: fp32 (whole) or a codec ({coded}) for the change against the "
                   "model they hold, without error feedback; a codec only with a strategy "
                   "that sends devices one full model (fedavg, signsgd)")


def guard_args(p: argparse.ArgumentParser) -> None:
    from broker_server.guard import MAX_SAMPLES, NORM_BOUND

    p.add_argument("--max-samples", type=int, default=MAX_SAMPLES, help="the most samples "
                   "one update counts with (besides the count its device registered)")
    p.add_argument("--norm-bound", type=float, default=NORM_BOUND, help="refuse an update "
                   "whose change RMS exceeds this x the median of accepted ones (inf: off)")


def train_args(p: argparse.ArgumentParser) -> None:
    """Local-training options shared by serve, demo and simulate."""
    p.add_argument("--epochs", type=int, default=2, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)


def serve(args: argparse.Namespace) -> int:
    from toolkit.field.serve import run_serve

    return run_serve(serve_job(args))


def serve_job(args: argparse.Namespace):
    """``fedge serve``'s flags as a ``ServeJob``, the strategy's typed options included."""
    from dataclasses import replace

    from device_runtime.credentials import payload_limit
    from toolkit.field.jobs import BrokerSettings, EvalSettings, GuardLimits, RoundSettings, \
        ScaleOutSettings, ServeJob
    from toolkit.planning.profiles import ProfileCatalogue

    rounds = RoundSettings(args.rounds, args.min_devices, args.round_timeout, args.epochs,
                           args.batch_size, args.lr)
    guard = GuardLimits(args.max_samples, args.norm_bound)
    scale = ScaleOutSettings(args.workers) if args.workers is not None else None
    broker = BrokerSettings(args.broker, args.credentials, args.signing_key, args.registry,
                            payload_limit(args.max_payload, args.credentials))
    job = ServeJob(args.job, Path(args.checkpoint), Path(args.state_dir), args.strategy,
                   args.codec, args.downlink, rounds=rounds, guard=guard, broker=broker,
                   scale_out=scale, evaluation=EvalSettings(args.eval_every, args.holdout),
                   profiles=args.profiles, profiles_file=args.profiles_file,
                   eval_data=Path(args.eval_data) if args.eval_data else None,
                   root_data=Path(args.root_data) if args.root_data else None,
                   report=Path(args.json) if args.json else None,
                   custom_models=tuple(args.allow_custom_model or ()))
    cat = ProfileCatalogue.load(args.profiles_file)
    names = [p.name for p in cat.select(args.profiles)]
    return replace(job, strategy_options=strategy_args.options(args, cat, names,
                                                               per_round=args.min_devices))


def _add_worker(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one aggregator worker for a job served with "
                       "fedge serve --workers (shares the updates over MQTT)")
    p.add_argument("--broker", required=True, help="mqtt://host:port of the job's broker")
    p.add_argument("--job", required=True)
    p.add_argument("--id", required=True, help="this worker's id, unique in the job")
    p.add_argument("--state-dir", required=True, help="the updates it accepted, so a "
                   "restarted worker loses none")
    aggregator_identity_args(p)
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="exit after this many seconds without a round")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by serve --workers
    p.set_defaults(func=worker)


def worker(args: argparse.Namespace) -> int:
    from toolkit.field.jobs import WorkerJob
    from toolkit.field.scaleout import run_worker

    return run_worker(WorkerJob(args.broker, args.job, args.id, Path(args.state_dir),
                                args.credentials, args.signing_key, args.registry,
                                args.idle_timeout, args.parent_pid))


def demo(args: argparse.Namespace) -> int:
    from toolkit.field.demo import run_demo
    from toolkit.field.jobs import DemoJob

    return run_demo(DemoJob(args.devices, args.rounds, args.alpha, args.seed,
                            args.round_timeout, args.epochs, args.batch_size, args.lr,
                            eval_every=args.eval_every, codec=args.codec,
                            downlink=args.downlink, variants=not args.no_variants,
                            broker=args.broker,
                            workdir=Path(args.workdir) if args.workdir else None,
                            report=Path(args.json) if args.json else None))


def aggregator_identity_args(p: argparse.ArgumentParser) -> None:
    """What ``fedge serve`` and ``fedge worker`` connect and sign as: the same identity."""
    p.add_argument("--credentials", help="DIR/credentials/aggregator.json from fedge secure "
                   "init: TLS with a client certificate, and a password")
    p.add_argument("--signing-key", help="the key every message to devices is signed with "
                   "(default: the credentials' signing_key, else $FEDGE_HOME/signing.key)")
    p.add_argument("--registry", help="the fleet's device public keys, registry.json from "
                   "fedge secure init (default: the credentials' registry)")

