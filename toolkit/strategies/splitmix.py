"""SplitMix's spec: an ensemble of narrow bases, each device training as many as its
budget allows (broker_server/strategies/splitmix.py, toolkit/strategies/server/splitmix.py,
device_runtime/training/splitmix.py)."""
from __future__ import annotations

import argparse
import dataclasses

from toolkit.errors import UsageError
from toolkit.strategies.spec import (
    PAPER,
    ArgsContext,
    Flag,
    SetupContext,
    SimRun,
    StrategySpec,
    checked_flags,
    checked_options,
    options_from,
)

# default=None throughout: "not given", so that --paper's settings stand (options_from).
ATOM = Flag(("--splitmix-atom",), {"type": float, "default": None,
                                   "help": "base width r (M = 1/r bases; default 0.125)"})
RESCALE_INIT = Flag(("--splitmix-rescale-init",), {
    "action": argparse.BooleanOptionalAction, "default": None,
    "help": "initialise each base as if full width, fan-in / r (default: off; --paper: on)"})
RESCALE_LAYER = Flag(("--splitmix-rescale-layer",), {
    "action": argparse.BooleanOptionalAction, "default": None,
    "help": "divide conv outputs by r while training; needs --splitmix-batch-stats "
            "(default: off; --paper: on)"})
BATCH_STATS = Flag(("--splitmix-batch-stats",), {
    "action": argparse.BooleanOptionalAction, "default": None,
    "help": "BatchNorm without running statistics: each batch's own, at test too "
            "(default: off; --paper: on)"})
BASE_SAMPLING = Flag(("--splitmix-base-sampling",), {
    "default": None, "metavar": "cyclic|reshuffle",
    "help": "each device's first base: from one fixed shuffled cycle, or reshuffled "
            "after each cycle (default: cyclic; --paper: reshuffle)"})
# Where each option comes from, for errors that name the flag.
FLAG_OF = {"atom": "--splitmix-atom", "budget_by_profile": "--budgets",
           "rescale_init": "--splitmix-rescale-init",
           "rescale_layer": "--splitmix-rescale-layer",
           "batch_stats": "--splitmix-batch-stats",
           "base_sampling": "--splitmix-base-sampling"}
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

    return checked_flags(options_from(
        args, SplitMixOptions, atom=args.splitmix_atom,
        budget_by_profile=budgets(args, ctx.catalogue) or None,
        rescale_init=args.splitmix_rescale_init, rescale_layer=args.splitmix_rescale_layer,
        batch_stats=args.splitmix_batch_stats, base_sampling=args.splitmix_base_sampling),
        FLAG_OF)


def _setup(options, ctx: SetupContext):
    """The ensemble's config, and budgets from the fleet's profiles unless given."""
    from broker_server.strategies.splitmix import SplitMixOptions
    from toolkit.strategies.server.splitmix import budgets_from_profiles, splitmix_config

    sm = checked_options(options, SplitMixOptions)
    if not sm.budgets and not sm.budget_by_profile:
        sm = dataclasses.replace(sm, budget_by_profile=budgets_from_profiles(ctx.fleet, sm.atom))
    cfg = ctx.cfg
    if cfg.arch != "splitmix":
        return splitmix_config(cfg, sm.atom, sm.model_kwargs()), sm
    if cfg.kwargs.get("bases") != sm.bases:  # a SplitMix checkpoint: its M must agree
        raise UsageError(f"--splitmix-atom: the checkpoint holds {cfg.kwargs.get('bases')} "
                         f"bases, the options ask for {sm.bases}")
    # ...and so must the tricks that act from now on (rescale_init acted once, when its
    # bases were made); a different config would have the server start afresh.
    for name in ("rescale_layer", "batch_stats"):
        if bool(cfg.kwargs.get(name)) != getattr(sm, name):
            raise UsageError(f"{FLAG_OF[name]}: the checkpoint's bases were trained with "
                             f"{name} {bool(cfg.kwargs.get(name))}, the options ask for "
                             f"{getattr(sm, name)}")
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
                    flags=(PAPER, ATOM, BUDGETS, RESCALE_INIT, RESCALE_LAYER, BATCH_STATS,
                           BASE_SAMPLING), from_args=_from_args, setup=_setup,
                    device_macs=_device_macs, report=_report)
