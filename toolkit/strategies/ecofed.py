"""EcoFed's spec: devices run a frozen, pre-trained head and send activations; the
server trains the tail on replay buffers (toolkit/strategies/server/ecofed.py)."""
from __future__ import annotations

import argparse

from toolkit.errors import UsageError
from toolkit.strategies.options import TAIL_INITS, EcoFedOptions
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

# EcoFed's head is frozen after pre-training on the small public split, so it must
# hold few parameters: on cnn-wide a cut after three convs (8.6% of the parameters)
# reached 0.77 where a cut after the first (0.03%) reached 0.89 (same fleet, 20
# rounds); the cut after a wide FC layer sends the fewest bytes but leaves only the
# classifier to learn.
FROZEN_SHARE = 0.05
# Shared with dpfl: the cut.
SPLIT_AFTER = Flag(("--split-after",), {
    "type": int, "help": "cut after this stage (default: the planner's choice, per profile "
                         "for dpfl)"})


# Where each option comes from, for errors that name the flag.
FLAG_OF = {"period": "--period", "iterations": "--tail-steps", "batch_size": "--tail-batch",
           "tail_init": "--tail-init"}


def _from_args(args: argparse.Namespace, ctx: ArgsContext):
    return checked_flags(options_from(
        args, EcoFedOptions, period=args.period, split_after=args.split_after,
        shared_tail=args.shared_tail, iterations=args.tail_steps, batch_size=args.tail_batch,
        tail_init=args.tail_init), FLAG_OF)


def _setup(options, ctx: SetupContext):
    """Per profile the cut the planner picks among those whose head holds at most
    FROZEN_SHARE of the parameters (or the given one for all), each cut's head as ONNX;
    the latest cut is the frozen depth."""
    from toolkit.model.analysis import stage_infos
    from toolkit.model.checkpoint import example_input
    from toolkit.planning.plan import choose_split, split_candidates
    from toolkit.strategies.server.ecofed import ACT_CODECS, EcoFedSetup, export_head
    from toolkit.strategies.spec import checked_options

    eo = checked_flags(checked_options(options, EcoFedOptions), FLAG_OF)
    cfg, model = ctx.cfg, ctx.model
    if ctx.codec not in ACT_CODECS:
        raise UsageError(f"--codec: ecofed sends activations, expected "
                         f"{' or '.join(ACT_CODECS)}, got {ctx.codec}")
    if model is None:
        raise UsageError("ecofed: needs the pre-trained model whose head it freezes")
    infos = stage_infos(model, example_input(cfg))
    total = sum(i.params for i in infos)
    if len(infos) < 2:
        raise UsageError(f"ecofed: the model has {len(infos)} stage(s); a split needs two")

    def light(cands):  # heads within FROZEN_SHARE; at least the earliest cut
        keep = [c for c in cands if c.head_params <= total * FROZEN_SHARE]
        return keep or cands[:1]
    cuts = {p.name: choose_split(split_candidates(infos, p) if eo.split_after else
                                 light(split_candidates(infos, p)), eo.split_after).after
            for p in ctx.fleet}
    after = max(cuts.values())  # the frozen depth; earlier cuts are bridged by the server
    if eo.tail_init == "fresh":  # the paper's: only the device layers are pre-trained
        fresh_tail(model, after)
    heads = {c: export_head(model, cfg, c, ctx.public_x[:64])
             for c in sorted(set(cuts.values()))}
    return cfg, EcoFedSetup(cfg, after, *heads[after], eo, cuts, heads, ctx.allowed)


def fresh_tail(model, after: int, seed: int = 0) -> None:
    """Initialise the stages from ``after`` on afresh (in place), as a model that was never
    trained there; seeded, so that a run is repeatable."""
    import torch

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for stage in model.stages[after:]:
            for m in stage.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
                if hasattr(m, "reset_running_stats"):
                    m.reset_running_stats()


def _pretrain(sim, cfg, x, y):
    """The model pre-trained on the server's public split (``sim``: SimOptions)."""
    import torch

    from toolkit.model import zoo
    from toolkit.model.train import TrainOptions, train

    eo = sim.strategy_options if isinstance(sim.strategy_options, EcoFedOptions) \
        else EcoFedOptions()
    torch.manual_seed(sim.seed)
    return train(zoo.build_model(cfg, sim.custom_models()), x, y,
                 TrainOptions(epochs=eo.pretrain_epochs, seed=sim.seed))


def head_macs(run: SimRun, cuts) -> dict[int, int]:
    """The MACs of the head before each cut (shared with dpfl)."""
    from toolkit.model.checkpoint import example_input
    from toolkit.model.pruning import count_macs
    from toolkit.model.zoo import split

    return {c: count_macs(split(run.model, c)[0], example_input(run.cfg))[0] for c in cuts}


def _device_macs(run: SimRun) -> dict[str, int]:
    """The frozen head each device runs (forward only)."""
    setup = run.options
    heads = head_macs(run, {setup.cut_of(p.name) for p in run.fleet})
    return {a.device: heads[setup.cut_of(p.name)] for a, p in zip(run.agents, run.fleet)}


def _report(run: SimRun) -> dict:
    setup = run.options
    return {"split_after": setup.split_after,
            "cuts": {p.name: setup.cut_of(p.name) for p in run.fleet},
            "act_shape": list(setup.act_shape)}


SPEC = StrategySpec(
    rule="toolkit.strategies.server.ecofed:EcoFed", options=EcoFedOptions,
    flags=(PAPER,
           Flag(("--period",), {"type": int, "default": None, "help":
                                "devices send activations every PERIOD rounds; the server "
                                "trains on its replay buffers in between (default: 2)"}),
           SPLIT_AFTER,
           Flag(("--shared-tail",), {"action": "store_true", "default": None,
                                     "help": "one tail trained over all buffers (default: "
                                             "one per device, averaged)"}),
           Flag(("--tail-steps",), {"type": int, "default": None, "metavar": "N",
                                    "help": "server SGD steps per tail a round (default: 200; "
                                            "the paper's 50)"}),
           Flag(("--tail-batch",), {"type": int, "default": None, "metavar": "B",
                                    "help": "their batch size (default: 32; the paper's 10)"}),
           Flag(("--tail-init",), {"choices": TAIL_INITS, "default": None,
                                   "help": "the tail at the start: the pre-trained model's, or "
                                           "fresh (the paper's: only the device layers are "
                                           "pre-trained; default: pretrained)"})),
    from_args=_from_args, setup=_setup, pretrain=_pretrain, device_macs=_device_macs,
    report=_report, device_trains=False)
