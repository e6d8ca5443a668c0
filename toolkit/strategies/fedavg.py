"""FedAvg's spec: sample-weighted averaging (broker_server/strategies/fedavg.py);
``--train-profiles`` limits training to some profiles; ``--robust``, ``--clip`` and
``--dp-*`` make the mean robust or private (``toolkit.strategies.robust``)."""
from __future__ import annotations

import argparse

from toolkit.strategies.robust import ROBUST_FLAGS, SHARE_CAP, robust_options, share_cap
from toolkit.strategies.spec import ArgsContext, Flag, SimRun, StrategySpec


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    from broker_server.strategies import FedAvgOptions

    robust, cap = robust_options(args, ctx.per_round), share_cap(args, ctx.per_round)
    if not args.train_profiles and robust is None and not cap:
        return None
    profiles = tuple(ctx.catalogue.get(p).name for p in args.train_profiles.split(",")) \
        if args.train_profiles else ()
    return FedAvgOptions(profiles, robust=robust, dp_seed=getattr(args, "dp_seed", None),
                         share_cap=cap)


def _device_macs(run: SimRun) -> dict[str, int]:
    """Devices of the profiles left out train nothing."""
    profiles = getattr(run.options, "profiles", ())
    return {a.device: run.macs if not profiles or p.name in profiles else 0
            for a, p in zip(run.agents, run.fleet)}


SPEC = StrategySpec(
    rule="broker_server.strategies.fedavg:FedAvg",
    options="broker_server.strategies.fedavg:FedAvgOptions",
    flags=(Flag(("--train-profiles",), {
        "help": "comma list: only devices of these profiles train (e.g. full width on the "
                "devices that can afford it)"}),) + ROBUST_FLAGS + (SHARE_CAP,),
    from_args=_from_args, device_macs=_device_macs)
