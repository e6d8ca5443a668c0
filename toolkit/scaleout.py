"""The CLI side of scale-out: ``fedge serve --workers N`` checks the job can be split,
starts N ``fedge worker`` processes and hands the aggregator a ``ScaleOut``;
``fedge worker`` runs one worker (also on another machine, against the same broker).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from toolkit.errors import UsageError

HEADER = 1024  # bytes an update frame's header may take beyond its tensors (+64 a tensor)


def check_args(args: argparse.Namespace, broker: str | None) -> dict:
    """Before anything is loaded: the worker count, the broker and the strategy/codec.
    Returns the fold options the workers need."""
    from broker_server.scaleout import ScaleOutError, check_split
    from broker_server.strategies import SignSGDOptions

    if args.workers < 1:
        raise UsageError(f"--workers: expected >= 1, got {args.workers}")
    if not broker:
        raise UsageError("--workers needs --broker (Mosquitto, EMQX, HiveMQ, ...): the "
                         "embedded broker (amqtt) has no shared subscriptions")
    opts = SignSGDOptions(getattr(args, "sign_decoder", "fv"),
                          bool(getattr(args, "sign_per_coordinate", False)))
    try:
        return check_split(args.strategy, args.codec, opts)
    except ScaleOutError as e:
        raise UsageError(str(e)) from None


def check_size(codec_name: str, shapes: dict, max_payload: int) -> None:
    """A frame over ``max_payload`` travels as chunks on sub-topics, and a shared
    subscription hands each chunk to any worker: refuse a job whose updates would."""
    from device_runtime import codecs

    spec = codecs.get(codec_name).wire_spec(shapes)
    size = HEADER + sum(64 + len(name) + _nbytes(t) for name, t in spec.items())
    if size > max_payload:
        raise UsageError(f"--workers: an update of this model with --codec {codec_name} is "
                         f"up to {size} bytes, over --max-payload {max_payload}: its chunks "
                         f"would reach different workers; raise --max-payload here and on "
                         f"every device, or use a smaller codec (fedmrn, sign)")


def _nbytes(spec) -> int:
    import numpy as np

    return int(np.prod(spec.shape, dtype=np.int64)) * np.dtype(spec.dtype).itemsize


def supervisor(args: argparse.Namespace, url: str, state_dir: Path):
    """``args.workers`` local ``fedge worker`` processes (not yet started), logs and
    state under ``state_dir/workers/w<i>``."""
    from toolkit.supervisor import Supervisor

    cmds, logs = {}, {}
    for i in range(args.workers):
        name, d = f"w{i}", state_dir / "workers" / f"w{i}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "toolkit", "worker", "--broker", url, "--job", args.job,
               "--id", name, "--state-dir", str(d), "--parent-pid", str(os.getpid())]
        if getattr(args, "credentials", None):
            cmd += ["--credentials", args.credentials]
        for flag, value in (("--signing-key", args.signing_key), ("--registry", args.registry)):
            if value:  # else the credentials' (or the default key), as serve found them
                cmd += [flag, str(Path(value).resolve())]
        cmds[name], logs[name] = cmd, d / "worker.log"
    return Supervisor(cmds, logs)


def start(args: argparse.Namespace, transport, url: str, fold_options: dict, trust):
    """The aggregator's ScaleOut and the Supervisor of its worker processes, started."""
    from broker_server.coordinator import ScaleOut, ScaleOutOptions

    sup = supervisor(args, url, Path(args.state_dir))
    sup.start()
    scale = ScaleOut(transport, args.job, ScaleOutOptions(args.workers, args.strategy,
                                                          args.codec, fold_options),
                     trust, alive=sup.check_started)
    return scale, sup


def add_worker_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("worker", help="run one aggregator worker for a job served with "
                       "fedge serve --workers (shares the updates over MQTT)")
    p.add_argument("--broker", required=True, help="mqtt://host:port of the job's broker")
    p.add_argument("--job", required=True)
    p.add_argument("--id", required=True, help="this worker's id, unique in the job")
    p.add_argument("--state-dir", required=True, help="the updates it accepted, so a "
                   "restarted worker loses none")
    p.add_argument("--credentials", help="the aggregator's credentials file (fedge secure "
                   "init)")
    p.add_argument("--signing-key", help="the aggregator's signing key (default: the "
                   "credentials' signing_key, else $FEDGE_HOME/signing.key)")
    p.add_argument("--registry", help="the fleet's device keys (default: the credentials' "
                   "registry)")
    p.add_argument("--idle-timeout", type=float, default=None,
                   help="exit after this many seconds without a round")
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)  # set by serve --workers
    p.set_defaults(func=run_worker)


def run_worker(args: argparse.Namespace) -> int:
    from broker_server.scaleout import check_worker_id, status
    from broker_server.workers import Worker, WorkerOptions
    from device_runtime.credentials import transport_kwargs
    from device_runtime.topics import Topics, check_id
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.fleet_keys import server_trust

    check_id("job", args.job)
    check_worker_id(args.id)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {args.id} %(message)s")
    trust = server_trust(args.job, None, args.signing_key, args.registry, args.credentials)
    will = (Topics(args.job).worker(args.id, "status"),
            status(args.id, "offline", trust.signer, args.job))
    t = MqttTransport(args.broker, f"fedge-{args.job}-worker-{args.id}", persistent=True,
                      will=will, **transport_kwargs(args.credentials))
    t.connect()
    try:
        counts = Worker(t, WorkerOptions(args.job, args.id, Path(args.state_dir),
                                         args.idle_timeout, args.parent_pid), trust).run()
    finally:
        t.close()
    print(f"worker {args.id}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0
