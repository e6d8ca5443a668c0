"""dpfl's spec: split learning, the head on devices and the tail on the server, one
minibatch exchange at a time (toolkit/strategies/server/dpfl.py,
device_runtime/training/split.py)."""
from __future__ import annotations

import argparse
from dataclasses import replace

from toolkit.errors import UsageError
from toolkit.strategies.ecofed import SPLIT_AFTER, head_macs
from toolkit.strategies.options import DPFLOptions
from toolkit.strategies.spec import ArgsContext, Flag, SetupContext, SimRun, StrategySpec


BATCH_ORDER = Flag(("--batch-order",), {
    "choices": ("arrival", "lockstep"), "default": None,
    "help": "the order the server trains the devices' batches in: as they arrive, or a "
            "step of every device at a time in device order (the same on every run; each "
            "step waits for the slowest device) (default: lockstep in fedge simulate, "
            "arrival in fedge serve)"})


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    order = getattr(args, "batch_order", None)
    return DPFLOptions(split_after=args.split_after,
                       lockstep=None if order is None else order == "lockstep")


def _setup(options, ctx: SetupContext):
    """Per profile the cut with the shortest estimated round (given one, that cut for
    all), and the activation shape at each cut."""
    from device_runtime.training.models import build_model
    from toolkit.model.analysis import stage_infos
    from toolkit.model.checkpoint import example_input
    from toolkit.planning.plan import choose_split, split_candidates
    from toolkit.strategies.server.dpfl import HEAD_CODECS, DPFLSetup, round_seconds
    from toolkit.strategies.spec import checked_options

    do, cfg = checked_options(options, DPFLOptions), ctx.cfg
    if do.lockstep is None:  # a simulation repeats itself; a real fleet waits for nobody
        do = replace(do, lockstep=ctx.simulated)
    if ctx.codec not in HEAD_CODECS:
        raise UsageError(f"--codec: dpfl sends its head whole, expected "
                         f"{' or '.join(HEAD_CODECS)}, got {ctx.codec}")
    infos = stage_infos(ctx.model if ctx.model is not None else build_model(cfg, ctx.allowed),
                        example_input(cfg))
    if len(infos) < 2:
        raise UsageError(f"dpfl: the model has {len(infos)} stage(s); a split needs two")
    cuts, shapes = {}, {}
    for p in ctx.fleet:
        cands = split_candidates(infos, p)
        c = choose_split(cands, do.split_after) if do.split_after else \
            min(cands, key=lambda c: (round_seconds(c, p), c.after))
        cuts[p.name], shapes[c.after] = c.after, tuple(c.act_shape)
    return cfg, DPFLSetup(cfg, cuts, shapes, do, ctx.allowed)


def _device_macs(run: SimRun) -> dict[str, int]:
    """The head each device trains."""
    setup = run.options
    heads = head_macs(run, set(setup.cuts.values()))
    return {a.device: heads[setup.cut_of(p.name)] for a, p in zip(run.agents, run.fleet)}


SPEC = StrategySpec(rule="toolkit.strategies.server.dpfl:DPFL", options=DPFLOptions,
                    flags=(SPLIT_AFTER, BATCH_ORDER),
                    from_args=_from_args, setup=_setup, device_macs=_device_macs,
                    report=lambda run: {"cuts": dict(run.options.cuts)})
