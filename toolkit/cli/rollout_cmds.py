"""``fedge rollout``: ship a new export version to a job's devices in stages, and
``fedge rollout --status``: where the job's rollout is (toolkit/field/rollout.py)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    from toolkit.cli.field_cmds import aggregator_identity_args

    p = sub.add_parser("rollout", help="roll a new signed export out to a job's devices: "
                       "a canary first, then everyone, or back")
    p.add_argument("--job", required=True)
    p.add_argument("--status", action="store_true", help="print the job's rollout state "
                   "and exit")
    p.add_argument("--manifest", help="the new export's manifest.json (signed, versioned, "
                   "made for --job)")
    p.add_argument("--broker", help="mqtt://host:port of the job's broker")
    p.add_argument("--canary", default="10%", help="share of the fleet that goes first "
                   "(10%% or 0.1)")
    p.add_argument("--hold", default="10m", help="how long the canary runs before it is "
                   "judged (90s, 10m, 1h)")
    p.add_argument("--max-error-rate", type=float, default=0.0, help="the canary's failed "
                   "share (a failed install or no report) that still proceeds")
    p.add_argument("--max-latency-ratio", type=float, default=2.0, help="the canary's "
                   "median new/previous latency that still proceeds")
    p.add_argument("--fleet-wait", default="10s", help="time to collect device statuses")
    p.add_argument("--report-timeout", default="2m", help="time for a stage's devices to "
                   "report")
    p.add_argument("--state", help="state file (default $FEDGE_HOME/rollouts/<job>.json); "
                   "a restarted rollout resumes from it")
    p.add_argument("--max-payload", type=int, help="bytes per MQTT message (default: the "
                   "credentials' max_payload, else 131072)")
    aggregator_identity_args(p)
    p.set_defaults(func=rollout)


def rollout(args: argparse.Namespace) -> int:
    from device_runtime.credentials import payload_limit
    from toolkit.errors import UsageError
    from toolkit.field.rollout import RolloutJob, parse_duration, parse_share, run_rollout
    from toolkit.field.rollout_state import RolloutState, default_path, describe

    if args.status:
        path = Path(args.state) if args.state else default_path(args.job)
        st = RolloutState.load(path)
        if st is None:
            print(f"no rollout of job {args.job} ({path})")
            return 0
        print(describe(st))
        return 0
    if not args.manifest or not args.broker:
        given = "only --manifest" if args.manifest else "only --broker" if args.broker \
            else "neither"
        raise UsageError(f"--manifest and --broker: expected both (or --status), got {given}")
    job = RolloutJob(Path(args.manifest), args.job, args.broker, parse_share(args.canary),
                     parse_duration("--hold", args.hold), args.max_error_rate,
                     args.max_latency_ratio, parse_duration("--fleet-wait", args.fleet_wait),
                     parse_duration("--report-timeout", args.report_timeout),
                     Path(args.state) if args.state else None, args.credentials,
                     args.signing_key, args.registry,
                     payload_limit(args.max_payload, args.credentials))
    return run_rollout(job)
