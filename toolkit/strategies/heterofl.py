"""HeteroFL's spec: nested width levels, each device training the widest it can afford
(broker_server/strategies/heterofl.py, toolkit/strategies/server/heterofl.py)."""
from __future__ import annotations

import argparse

from toolkit.strategies.spec import (
    ArgsContext,
    SetupContext,
    SimRun,
    StrategySpec,
    checked_options,
)
from toolkit.strategies.splitmix import BUDGETS, budgets


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    from broker_server.strategies.heterofl import HeteroFLOptions

    return HeteroFLOptions(width_by_profile=budgets(args, ctx.catalogue))


def _setup(options, ctx: SetupContext):
    """Nested width levels from the options' budgets, else from the fleet's profiles."""
    from broker_server.strategies.heterofl import HeteroFLOptions
    from toolkit.strategies.server.heterofl import heterofl_options
    from toolkit.strategies.server.splitmix import budgets_from_profiles

    ho = checked_options(options, HeteroFLOptions)
    if ho.levels:
        return ctx.cfg, ho
    by_profile = ho.width_by_profile or budgets_from_profiles(ctx.fleet, 0.125)
    return ctx.cfg, heterofl_options(ctx.cfg, by_profile, ho.widths)


def _device_macs(run: SimRun) -> dict[str, int]:
    """The width level each device trains."""
    from device_runtime.training.models import ModelConfig, build_model
    from toolkit.model.checkpoint import example_input
    from toolkit.model.pruning import count_macs

    by_level = {}
    for w, level in run.options.levels.items():
        cfg = ModelConfig.from_json(level["model"])
        by_level[w] = count_macs(build_model(cfg), example_input(cfg))[0]
    return {a.device: by_level[run.options.level_of(a.device, p.name)]
            for a, p in zip(run.agents, run.fleet)}


SPEC = StrategySpec(rule="broker_server.strategies.heterofl:HeteroFL",
                    options="broker_server.strategies.heterofl:HeteroFLOptions",
                    flags=(BUDGETS,), from_args=_from_args, setup=_setup,
                    device_macs=_device_macs)
