"""``fedge dashboard``: a job's live web page and Prometheus ``/metrics``."""
from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="a live web page and /metrics for a job, from a "
                       "read-only MQTT subscription (needs the server extra)")
    p.add_argument("--broker", required=True, help="mqtt://host:port of the job's broker")
    p.add_argument("--job", required=True)
    p.add_argument("--credentials", help="DIR/credentials/dashboard.json from fedge secure "
                   "init: a read-only broker login, server.pub and registry.json")
    p.add_argument("--trust", metavar="PUBKEY", help="the aggregator's public key "
                   "(server.pub); default: the credentials' trust")
    p.add_argument("--registry", help="the devices' public keys (registry.json); default: "
                   "the credentials' registry")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8765)
    p.set_defaults(func=dashboard)


def dashboard(args: argparse.Namespace) -> int:
    from toolkit.field.dashboard.run import DashboardOptions, run_dashboard

    return run_dashboard(DashboardOptions(args.broker, args.job, args.credentials,
                                          args.trust, args.registry, args.host, args.port))
