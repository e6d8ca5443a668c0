"""``fedge serve``, ``fedge device`` and ``fedge demo``: the field loop over MQTT."""
from __future__ import annotations

import argparse

from pathlib import Path

from device_runtime import threads
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
    p.add_argument("--profiles", default="all", help="the fleet's profiles (comma list or "
                   "all): they set SplitMix/HeteroFL budgets and REFT's pruning")
    p.add_argument("--profiles-file")
    train_args(p)
    strategy_args.add(p)
    p.add_argument("--max-payload", type=int, default=128 * 1024)
    aggregator_identity_args(p)
    p.add_argument("--workers", type=int, help="fold the updates in N worker processes "
                   "sharing the update topic ($share; needs --broker with shared "
                   "subscriptions: Mosquitto, EMQX, HiveMQ)")
    allow_arg(p)
    p.set_defaults(func=serve)
    _add_worker(sub)

    p = sub.add_parser("device", help="run the device agent")
    p.add_argument("--config", help="TOML file with these options (as `fedge bundle` "
                   "writes it); options given here win")
    p.add_argument("--broker")
    p.add_argument("--job")
    p.add_argument("--id")
    p.add_argument("--profile")
    p.add_argument("--profiles-file")
    p.add_argument("--data", help="the device's .npz shard (x, y)")
    p.add_argument("--threads", type=int, help="torch and onnxruntime threads (default: "
                   "FEDGE_THREADS, else the cores this process may use)")
    p.add_argument("--max-payload", type=int, help="bytes per MQTT message (131072)")
    p.add_argument("--idle-timeout", type=float, default=None)
    p.add_argument("--credentials", help="DIR/credentials/<id>.json from fedge secure init: "
                   "TLS with a client certificate, and a password")
    p.add_argument("--manifest", dest="manifest", help="the export's manifest.json: its "
                   "signature and this profile's artifacts are verified before any task; "
                   "a failure is published as the device's status and exits 6")
    p.add_argument("--trust", dest="trust", metavar="PUBKEY", help="the aggregator's "
                   "public key: every message from the job and the manifest must be signed "
                   "with it (default: the credentials' trust)")
    p.add_argument("--key", help="this device's signing key: its status and updates are "
                   "signed with it (default: the credentials' signing_key)")
    p.add_argument("--models-dir", help="where rolled-out exports are installed (default "
                   "$FEDGE_HOME/models/<job>/<id>); a newer version a rollout installed there "
                   "wins over an older --manifest")
    p.add_argument("--check", action="store_true", help="check the config, data, "
                   "credentials and signed artifacts, then exit without connecting")
    allow_arg(p)  # else the config file's allow_custom_model list
    p.add_argument("--allow-rollback", action="store_true", help="accept an export older "
                   "than the newest this device accepted for the job, and record its version "
                   "(an operator's one-off command; never in the config)")
    p.set_defaults(func=device)

    p = sub.add_parser("demo", help="the whole loop on one machine: 8 device processes, "
                       "an aggregator and a broker")
    p.add_argument("--broker", help="mqtt://host:port (default: the embedded broker)")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--round-timeout", type=float, default=30.0)
    p.add_argument("--workdir", help="keep shards, state and plots here")
    p.add_argument("--json", default="fedge-demo.json", help="report (a PNG plot goes beside)")
    p.add_argument("--eval-every", type=int, default=5, help="the devices score the global "
                   "model on held-out data every K rounds (0: off)")
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

    from toolkit.field.jobs import BrokerSettings, EvalSettings, GuardLimits, RoundSettings, \
        ScaleOutSettings, ServeJob
    from toolkit.planning.profiles import ProfileCatalogue

    rounds = RoundSettings(args.rounds, args.min_devices, args.round_timeout, args.epochs,
                           args.batch_size, args.lr)
    guard = GuardLimits(args.max_samples, args.norm_bound)
    scale = ScaleOutSettings(args.workers) if args.workers is not None else None
    broker = BrokerSettings(args.broker, args.credentials, args.signing_key, args.registry,
                            args.max_payload)
    job = ServeJob(args.job, Path(args.checkpoint), Path(args.state_dir), args.strategy,
                   args.codec, args.downlink, rounds=rounds, guard=guard, broker=broker,
                   scale_out=scale, evaluation=EvalSettings(args.eval_every, args.holdout),
                   profiles=args.profiles, profiles_file=args.profiles_file,
                   eval_data=Path(args.eval_data) if args.eval_data else None,
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


def device(args: argparse.Namespace) -> int:
    import logging

    from device_runtime.agent import AgentOptions, DeviceAgent, status_will
    from device_runtime.config import load_config, merge
    from device_runtime.credentials import key_paths, transport_kwargs
    from device_runtime.data import load_shard
    from device_runtime.keys import PublicKey, Signer
    from device_runtime.local_models import LocalModels
    from device_runtime.preflight import check_options
    from device_runtime.topics import Topics, check_id
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.planning.profiles import ProfileCatalogue

    config = load_config(args.config) if args.config else None
    o = argparse.Namespace(**merge(vars(args), config))
    o.threads = o.threads or threads.budget()  # FEDGE_THREADS, else its share of the cores
    o.max_payload = o.max_payload or 128 * 1024
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {o.id} %(message)s")
    ProfileCatalogue.load(o.profiles_file).get(o.profile)
    check_id("device", o.id)
    allowed = LocalModels.parse(o.allow_custom_model)
    creds = transport_kwargs(o.credentials, o.id)
    o.key, o.trust = key_paths(o.credentials, {"signing_key": o.key, "trust": o.trust})
    check_options(o.manifest, o.trust, o.key)  # usage mistakes: before anything is published
    key, server_key = Signer.load(o.key), PublicKey.load(o.trust)
    if o.check:
        return _check(o)
    x, y = load_shard(o.data)
    topics = Topics(o.job)
    t = MqttTransport(o.broker, f"fedge-{o.job}-{o.id}", max_payload=o.max_payload,
                      will=status_will(topics, o.id, key), persistent=True, **creds)
    t.connect()
    try:
        agent = DeviceAgent(t, AgentOptions(o.job, o.id, o.profile, o.threads,
                                            o.idle_timeout, manifest=o.manifest,
                                            trust=o.trust, key=key, server_key=server_key,
                                            custom_models=allowed,
                                            allow_rollback=o.allow_rollback,
                                            models_dir=o.models_dir), x, y)
        rounds = agent.run()
    finally:
        t.close()
    print(f"device {o.id}: trained {rounds} rounds")
    return 0


def _check(o: argparse.Namespace) -> int:
    """`fedge device --check`: what install.sh runs before it enables the unit. The data
    shard may come later (devices collect it); a shard that is there must load."""
    from pathlib import Path

    from device_runtime.data import load_shard
    from device_runtime.preflight import check_device
    from device_runtime.rollback import ExportPolicy
    from device_runtime.transport.url import BrokerURL

    what = f"{o.profile}, broker {BrokerURL.parse(o.broker)}"  # a bad URL: one-line error
    if o.credentials is not None:
        what += f", TLS as {o.id}"  # transport_kwargs already checked the files
    if o.manifest is not None:
        c = check_device(o.manifest, o.profile, o.trust, o.threads,
                         ExportPolicy(o.job, o.allow_rollback))
        was = f", was {c.previous}" if c.previous not in (None, c.version) else ""
        what += (f", export version {c.version}{was} for job {o.job}, {c.artifacts} artifacts "
                 f"verified (key {c.key_id}), {c.provider}")
    if Path(o.data).exists():
        what += f", {len(load_shard(o.data)[1])} samples"
    else:
        what += f"; no data yet at {o.data}"
    print(f"device {o.id}: ok ({what})")
    return 0


def demo(args: argparse.Namespace) -> int:
    from toolkit.field.demo import run_demo
    from toolkit.field.jobs import DemoJob

    return run_demo(DemoJob(args.devices, args.rounds, args.alpha, args.seed,
                            args.round_timeout, args.epochs, args.batch_size, args.lr,
                            eval_every=args.eval_every, broker=args.broker,
                            workdir=Path(args.workdir) if args.workdir else None,
                            report=Path(args.json)))


def aggregator_identity_args(p: argparse.ArgumentParser) -> None:
    """What ``fedge serve`` and ``fedge worker`` connect and sign as: the same identity."""
    p.add_argument("--credentials", help="DIR/credentials/aggregator.json from fedge secure "
                   "init: TLS with a client certificate, and a password")
    p.add_argument("--signing-key", help="the key every message to devices is signed with "
                   "(default: the credentials' signing_key, else $FEDGE_HOME/signing.key)")
    p.add_argument("--registry", help="the fleet's device public keys, registry.json from "
                   "fedge secure init (default: the credentials' registry)")

