"""``fedge secure init``: a CA, certificates, passwords and ACLs for a Mosquitto broker."""
from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("secure", help="TLS certificates, passwords and ACLs for a fleet's "
                       "Mosquitto broker")
    steps = p.add_subparsers(dest="secure_command", metavar="SUBCOMMAND",
                             parser_class=type(p))
    steps.required = True
    q = steps.add_parser("init", help="write a CA, server and per-client certificates, "
                         "credentials and a Mosquitto config (TLS, passwords, ACL) to --out")
    q.add_argument("--devices", nargs="+", required=True, metavar="ID",
                   help="the fleet's device ids (each also its MQTT username)")
    q.add_argument("--out", required=True, help="a new (or empty) folder")
    q.add_argument("--port", type=int, default=8883, help="the TLS listener's port")
    q.add_argument("--host", action="append", default=[], metavar="NAME",
                   help="another name or address clients use for the broker (repeatable); "
                   "localhost, loopback and this machine's hostname are always in")
    q.add_argument("--days", type=int, default=825, help="certificate lifetime")
    q.set_defaults(func=init)


def init(args: argparse.Namespace) -> int:
    from toolkit.secure import AGGREGATOR, SecureOptions
    from toolkit.secure import init as secure_init

    s = secure_init(SecureOptions(tuple(args.devices), Path(args.out), args.port,
                                  tuple(args.host), args.days))
    creds = Path(s["out"]) / "credentials"
    n = len(s["credentials"]) - 1
    print(f"wrote {s['out']}: a CA, a broker certificate for {', '.join(s['server_names'])}, "
          f"credentials for {n} device{'s' if n != 1 else ''} and the {AGGREGATOR}")
    print(f"broker:     mosquitto -c {s['conf']}")
    print(f"aggregator: fedge serve --broker mqtts://HOST:{s['port']} --credentials "
          f"{creds / (AGGREGATOR + '.json')} ...")
    print(f"device:     fedge device --broker mqtts://HOST:{s['port']} --credentials "
          f"{creds}/<id>.json --id <id> ...")
    return 0
