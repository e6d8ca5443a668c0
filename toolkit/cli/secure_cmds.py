"""``fedge secure init|add|revoke``: a fleet's CA, identities, signing keys, ACL and
Mosquitto config, and one device in or out of it later."""
from __future__ import annotations

import argparse
from pathlib import Path

MIB = 1 << 20


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("secure", help="TLS certificates, signing keys and ACLs for a fleet's "
                       "Mosquitto broker")
    steps = p.add_subparsers(dest="secure_command", metavar="SUBCOMMAND",
                             parser_class=type(p))
    steps.required = True
    q = steps.add_parser("init", help="write a CA, server and per-client certificates, "
                         "signing keys, credentials and a Mosquitto config to --out")
    q.add_argument("--devices", nargs="+", required=True, metavar="ID",
                   help="the fleet's device ids (each its certificate's CN and MQTT username)")
    q.add_argument("--out", required=True, help="a new (or empty) folder")
    q.add_argument("--port", type=int, default=8883, help="the devices' TLS listener")
    q.add_argument("--aggregator-port", type=int, default=0, metavar="PORT",
                   help="the aggregator's TLS listener (default: --port + 1)")
    q.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another name or address clients use for the broker (repeatable); "
                   "localhost, loopback and this machine's hostname are always in")
    q.add_argument("--days", type=int, default=825, help="certificate lifetime")
    q.add_argument("--keys-only", action="store_true",
                   help="only signing keys, server.pub, registry.json and credentials: no "
                   "TLS, passwords or broker config (for a broker without TLS)")
    q.add_argument("--signing-key", metavar="FILE",
                   help="the aggregator's Ed25519 key, e.g. the export key "
                   "$FEDGE_HOME/signing.key (default: a new certs/aggregator.signing.key)")
    q.add_argument("--max-message", type=int, default=64 * MIB, metavar="BYTES",
                   help="the largest MQTT payload the broker accepts (64 MiB)")
    q.add_argument("--max-queued-messages", type=int, default=10_000, metavar="N",
                   help="messages the broker queues per client (10000)")
    q.add_argument("--max-queued-bytes", type=int, default=0, metavar="BYTES",
                   help="bytes the broker queues per client (4 x --max-message)")
    q.set_defaults(func=init)
    for name, what in (("add", ("issue one more device's credentials and list it in the "
                                "ACL and the key registry")),
                       ("revoke", ("take a device out of the key registry and the ACL and "
                                   "revoke its certificate (CRL)"))):
        r = steps.add_parser(name, help=what)
        r.add_argument("id", metavar="ID", help="the device id (add: or 'dashboard', the "
                       "read-only dashboard login, for a fleet written before init issued it)")
        r.add_argument("--dir", required=True, help="the folder fedge secure init wrote")
        r.add_argument("--days", type=int, default=825,
                       help="certificate lifetime (add) / the CRL's (revoke)")
        r.set_defaults(func=add_device if name == "add" else revoke_device)


def init(args: argparse.Namespace) -> int:
    from toolkit.deploy.secure import AGGREGATOR, SecureOptions
    from toolkit.deploy.secure import init as secure_init
    from toolkit.deploy.secure_conf import Limits

    limits = Limits(args.max_message, args.max_queued_messages, args.max_queued_bytes)
    s = secure_init(SecureOptions(
        tuple(args.devices), Path(args.out), args.port, tuple(args.host), args.days,
        args.aggregator_port, args.keys_only,
        Path(args.signing_key) if args.signing_key else None, limits))
    creds = Path(s["out"]) / "credentials"
    n = len(s["credentials"]) - 2  # the aggregator and the dashboard
    devices = f"{n} device{'s' if n != 1 else ''}"
    if args.keys_only:
        print(f"wrote {s['out']}: signing keys and credentials for {devices} and the "
              f"{AGGREGATOR} (no TLS)")
    else:
        print(f"wrote {s['out']}: a CA, a broker certificate for "
              f"{', '.join(s['server_names'])}, credentials for {devices} and the {AGGREGATOR}")
        print(f"broker:     mosquitto -c {s['conf']}")
    print(f"signing:    {s['signing_key']} (devices trust {s['out']}/server.pub)")
    scheme = "mqtt" if args.keys_only else "mqtts"
    print(f"aggregator: fedge serve --broker {scheme}://HOST:{s['aggregator_port']} "
          f"--credentials {creds / (AGGREGATOR + '.json')} ...")
    print(f"device:     fedge device --broker {scheme}://HOST:{s['port']} --credentials "
          f"{creds}/<id>.json --id <id> ...")
    print(f"dashboard:  fedge dashboard --broker {scheme}://HOST:{s['aggregator_port']} "
          f"--credentials {creds / 'dashboard.json'} --job <job>  (reads only)")
    return 0


def add_device(args: argparse.Namespace) -> int:
    from toolkit.deploy.secure_conf import DASHBOARD
    from toolkit.deploy.secure_fleet import add as secure_add
    from toolkit.deploy.secure_fleet import add_dashboard

    if args.id == DASHBOARD:
        s = add_dashboard(Path(args.dir), args.days)
        print(f"issued the read-only {DASHBOARD} login in {s['out']}: credentials "
              f"{s['credentials']}")
        if s["tls"]:
            print("reload the broker (kill -HUP <mosquitto's pid>): it re-reads the "
                  "password file and the ACL")
        return 0
    s = secure_add(Path(args.dir), args.id, args.days)
    print(f"added {s['device']} to {s['out']} (signing key {s['key_id']}): "
          f"credentials {s['credentials']}")
    if s["tls"]:
        print("reload the broker (kill -HUP <mosquitto's pid>) so the ACL lists it")
    return 0


def revoke_device(args: argparse.Namespace) -> int:
    from toolkit.deploy.secure_fleet import revoke as secure_revoke

    s = secure_revoke(Path(args.dir), args.id, args.days)
    print(f"revoked {s['device']} in {s['out']}: out of registry.json"
          + (", the ACL and by the CRL" if s["tls"] else ""))
    if s["tls"]:
        print("reload the broker (kill -HUP <mosquitto's pid>): it re-reads the ACL and CRL")
    return 0
