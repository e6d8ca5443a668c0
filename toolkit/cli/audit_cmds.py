"""``fedge audit``: run issue 20's attacks against one's own live job (toolkit.field.audit)."""
from __future__ import annotations

import argparse
from pathlib import Path

from device_runtime.errors import EXIT_FAILURE


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="attack your own live job as a hostile client of its "
                       "broker and report what was refused (exit 1 if anything was not)")
    p.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://...")
    p.add_argument("--job", required=True)
    p.add_argument("--credentials", help="a client's credentials file (e.g. a device's from "
                   "fedge secure init, to play a leaked device)")
    p.add_argument("--seconds", type=float, default=10.0, help="how long each attack "
                   "watches the job, and how long the chunk flood lasts")
    p.add_argument("--progress-timeout", type=float, default=120.0, help="after the flood, "
                   "how long to wait for the job's next round")
    p.add_argument("--giant-mib", type=float, default=64.0, help="the giant message's size "
                   "(twice the broker's limit)")
    p.add_argument("--flood-rate", type=float, default=500.0, help="chunks per second")
    p.add_argument("--json", help="write the report here")
    p.set_defaults(func=audit)


def audit(args: argparse.Namespace) -> int:
    from toolkit.field.audit import NOT_REFUSED, AuditOptions, run

    findings = run(AuditOptions(args.broker, args.job, args.credentials, args.seconds,
                                Path(args.json) if args.json else None,
                                args.progress_timeout, int(args.giant_mib * (1 << 20)),
                                args.flood_rate))
    bad = [f.attack for f in findings if f.verdict == NOT_REFUSED]
    print(f"NOT REFUSED: {', '.join(bad)}" if bad else "every attack was refused or held")
    return EXIT_FAILURE if bad else 0
