"""REFT's spec: each device trains a model pruned to its compute; the server averages
the pruned models back in place and distils on its public split
(toolkit/strategies/server/reft.py)."""
from __future__ import annotations

import argparse

from toolkit.errors import UsageError
from toolkit.strategies.options import REFTOptions
from toolkit.strategies.spec import (
    PAPER,
    ArgsContext,
    Flag,
    SetupContext,
    SimRun,
    StrategySpec,
    checked_flags,
    options_from,
)


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    average = None if args.reft_average is None else args.reft_average == "yes"
    return checked_flags(options_from(
        args, REFTOptions, uplink=args.reft_uplink, average_first=average,
        one_shot=args.reft_one_shot, distill_epochs=args.reft_distill_epochs),
        {"distill_epochs": "--reft-distill-epochs"})


def _setup(options, ctx: SetupContext):
    """MAC fractions per profile from the planner, the public split."""
    from device_runtime.training.models import build_model
    from toolkit.model.checkpoint import example_input
    from toolkit.model.pruning import count_macs
    from toolkit.planning.plan import plan_fleet
    from toolkit.strategies.server.reft import LOGIT_CODECS, REFTSetup
    from toolkit.strategies.spec import checked_options

    ro, cfg = checked_flags(checked_options(options, REFTOptions), {}), ctx.cfg
    if ro.uplink == "logits" and ctx.codec not in LOGIT_CODECS:
        raise UsageError(f"--reft-uplink logits: expected --codec {', '.join(LOGIT_CODECS)}, "
                         f"got {ctx.codec}")
    if cfg.arch == "custom":  # its variants are zoo configs with pruned channel counts
        raise UsageError("reft: pruned variants need a zoo architecture, got a custom model")
    macs, params = count_macs(build_model(cfg), example_input(cfg))
    plans = plan_fleet(list({p.name: p for p in ctx.fleet}.values()), macs, params)
    fractions = {n: pl.compute_fraction for n, pl in plans.items()}
    for name, f in ro.fractions.items():
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise UsageError(f"REFTOptions.fractions[{name!r}]: expected a MAC share in "
                             f"(0, 1], got {f!r}")
    return cfg, REFTSetup(cfg, ctx.public_x, {**fractions, **ro.fractions}, ro)


def _device_macs(run: SimRun) -> dict[str, int]:
    """The pruned model each device trained (last round)."""
    return {a.device: run.strategy.macs_of(p.name) for a, p in zip(run.agents, run.fleet)}


SPEC = StrategySpec(
    rule="toolkit.strategies.server.reft:REFT", options=REFTOptions,
    flags=(PAPER,
           Flag(("--reft-uplink",), {
               "choices": ("weights", "logits"), "default": None,
               "help": "devices send their pruned models, or only their logits on the "
                       "server's public split (default: weights)"}),
           Flag(("--reft-average",), {
               "choices": ("yes", "no"), "default": None,
               "help": "average the clients' pruned weights back into place before "
                       "distilling (default: yes; the paper: no)"}),
           Flag(("--reft-one-shot",), {
               "action": "store_true", "default": None,
               "help": "prune once in the first round and keep each profile's channels "
                       "(the paper's; default: prune the new global model every round)"}),
           Flag(("--reft-distill-epochs",), {
               "type": int, "default": None, "metavar": "E",
               "help": "distillation epochs on the public split a round (default: 3; 0: "
                       "averaging only)"})),
    from_args=_from_args, setup=_setup, device_macs=_device_macs)
