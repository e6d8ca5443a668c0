"""FedAvg's spec: sample-weighted averaging (broker_server/strategies/fedavg.py);
``--train-profiles`` limits training to some profiles."""
from __future__ import annotations

import argparse

from toolkit.strategies.spec import ArgsContext, Flag, SimRun, StrategySpec


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    from broker_server.strategies import FedAvgOptions

    if not args.train_profiles:
        return None
    return FedAvgOptions(tuple(ctx.catalogue.get(p).name for p in args.train_profiles.split(",")))


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
                "devices that can afford it)"}),),
    from_args=_from_args, device_macs=_device_macs)
