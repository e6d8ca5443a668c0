"""``fedge device``: run the device agent (or ``--check`` its set-up and exit).

Its own module, apart from ``serve``'s, so that starting a device builds only this
parser: no strategy table, no server module. Everything it runs is imported inside
the command from ``device_runtime`` (torch only once a training task needs it).
"""
from __future__ import annotations

import argparse

from device_runtime import threads
from toolkit.cli.model_cmds import allow_arg


def add(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--max-payload", type=int, help="bytes per MQTT message (default: "
                   "the credentials' max_payload, else 131072)")
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


def device(args: argparse.Namespace) -> int:
    import logging

    from device_runtime.agent import AgentOptions, DeviceAgent, status_will
    from device_runtime.config import load_config, merge
    from device_runtime.credentials import key_paths, payload_limit, transport_kwargs
    from device_runtime.data import load_shard
    from device_runtime.keys import PublicKey, Signer
    from device_runtime.local_models import LocalModels
    from device_runtime.notice import Notice
    from device_runtime.preflight import check_options
    from device_runtime.topics import Topics, check_id
    from device_runtime.transport.mqtt import MqttTransport
    from toolkit.planning.profiles import ProfileCatalogue

    config = load_config(args.config) if args.config else None
    o = argparse.Namespace(**merge(vars(args), config))
    o.threads = o.threads or threads.budget()  # FEDGE_THREADS, else its share of the cores
    o.max_payload = payload_limit(o.max_payload, o.credentials)
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
        agent.notice = Notice(logging.getLogger("fedge.device").warning)
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
