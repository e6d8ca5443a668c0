"""SplitMix's spec: an ensemble of narrow bases, each device training as many as its
budget allows (broker_server/strategies/splitmix.py, toolkit/strategies/server/splitmix.py,
device_runtime/training/splitmix.py)."""
from __future__ import annotations

import argparse
import dataclasses

from toolkit.errors import UsageError
from toolkit.strategies.spec import (
    ArgsContext,
    Flag,
    SetupContext,
    SimRun,
    StrategySpec,
    checked_options,
)

ATOM = Flag(("--splitmix-atom",), {"type": float, "default": 0.125,
                                   "help": "base width r (M = 1/r bases)"})
# Shared with heterofl: per profile, the width it can afford.
BUDGETS = Flag(("--budgets",), {"help": "comma list profile=width, e.g. rpi4=0.25,jetson-orin-"
                                        "nano=1 (default: from each profile's compute)"})


def budgets(args: argparse.Namespace, cat) -> dict[str, float]:
    """``--budgets`` as profile -> width in (0, 1]."""
    out = {}
    for item in (args.budgets or "").split(","):
        if not item.strip():
            continue
        prof, eq, value = item.partition("=")
        try:
            b = float(value)
        except ValueError:
            b = -1.0
        if not eq or not 0 < b <= 1:
            raise UsageError(f"--budgets: expected profile=width with width in (0, 1], got "
                             f"{item!r}")
        out[cat.get(prof.strip()).name] = b
    return out


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    from broker_server.strategies.splitmix import SplitMixOptions

    sm = SplitMixOptions(args.splitmix_atom, budget_by_profile=budgets(args, ctx.catalogue))
    try:
        sm.check()
    except ValueError as e:
        raise UsageError(f"--splitmix-atom/--budgets: {e}") from None
    return sm


def _setup(options, ctx: SetupContext):
    """The ensemble's config, and budgets from the fleet's profiles unless given."""
    from broker_server.strategies.splitmix import SplitMixOptions
    from toolkit.strategies.server.splitmix import budgets_from_profiles, splitmix_config

    sm = checked_options(options, SplitMixOptions)
    if not sm.budgets and not sm.budget_by_profile:
        sm = dataclasses.replace(sm, budget_by_profile=budgets_from_profiles(ctx.fleet, sm.atom))
    cfg = ctx.cfg
    if cfg.arch != "splitmix":
        return splitmix_config(cfg, sm.atom), sm
    if cfg.kwargs.get("bases") != sm.bases:  # a SplitMix checkpoint: its M must agree
        raise UsageError(f"--splitmix-atom: the checkpoint holds {cfg.kwargs.get('bases')} "
                         f"bases, the options ask for {sm.bases}")
    return cfg, sm


def _device_macs(run: SimRun) -> dict[str, int]:
    """A device trains n of the M bases."""
    sm = run.options
    return {a.device: run.macs * sm.bases_of(a.device, p.name) // sm.bases
            for a, p in zip(run.agents, run.fleet)}


def _report(run: SimRun) -> dict:
    from toolkit.strategies.server.splitmix import width_accuracy

    return {"width_accuracy": width_accuracy(run.model, run.x_test, run.y_test)}


SPEC = StrategySpec(rule="broker_server.strategies.splitmix:SplitMix",
                    options="broker_server.strategies.splitmix:SplitMixOptions",
                    flags=(ATOM, BUDGETS), from_args=_from_args, setup=_setup,
                    device_macs=_device_macs, report=_report)
