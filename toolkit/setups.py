"""Server-side strategy setup: from the model config and the fleet's profiles to the
typed options a strategy needs (SplitMix budgets and the bases' config, HeteroFL's
width levels, REFT's MAC shares and public split). Shared by ``fedge simulate`` and
``fedge serve``, so both build a strategy the same way.
"""
from __future__ import annotations

import numpy as np

from device_runtime.local_models import NO_CUSTOM, LocalModels
from device_runtime.training.models import ModelConfig
from toolkit.errors import UsageError
from toolkit.profiles import DeviceProfile


# EcoFed's head is frozen after pre-training on the small public split, so it must
# hold few parameters: on cnn-wide a cut after three convs (8.6% of the parameters)
# reached 0.77 where a cut after the first (0.03%) reached 0.89 (same fleet, 20
# rounds); the cut after a wide FC layer sends the fewest bytes but leaves only the
# classifier to learn.
FROZEN_SHARE = 0.05


def check_strategy(name: str) -> None:
    """Register the toolkit's server-trained strategies (reft, ecofed, dpfl: they need
    torch, so broker_server cannot) and check ``name``: an unknown one is a one-line
    error listing the valid names. Shared by serve, simulate and bundle."""
    from broker_server.strategies import STRATEGIES
    from toolkit.dpfl import register_dpfl
    from toolkit.ecofed import register_ecofed
    from toolkit.reft import register_reft

    register_reft()
    register_ecofed()
    register_dpfl()
    STRATEGIES.get(name)


def setup_strategy(strategy: str, cfg: ModelConfig, fleet: list[DeviceProfile],
                   public_x: np.ndarray, codec: str, options: object | None,
                   model=None, allowed: LocalModels = NO_CUSTOM
                   ) -> tuple[ModelConfig, object | None]:
    """The model config the job trains and the strategy's options (``options`` filled in
    from the fleet where the user left them out). ``model``: the pre-trained model
    (EcoFed freezes its head); ``allowed``: the custom factories the operator named, for
    the strategies that rebuild ``cfg`` on the server (dpfl, ecofed)."""
    if strategy == "splitmix":
        return _splitmix(options, cfg, fleet)
    if strategy == "heterofl":
        return cfg, _heterofl(options, cfg, fleet)
    if strategy == "reft":
        return cfg, _reft(options, codec, cfg, fleet, public_x)
    if strategy == "ecofed":
        return cfg, _ecofed(options, codec, cfg, fleet, public_x, model, allowed)
    if strategy == "dpfl":
        return cfg, _dpfl(options, codec, cfg, fleet, model, allowed)
    return cfg, options


def _dpfl(options, codec: str, cfg: ModelConfig, fleet: list[DeviceProfile], model,
          allowed: LocalModels):
    """dpfl's setup: per profile the cut with the shortest estimated round (given one,
    that cut for all), and the activation shape at each cut."""
    from device_runtime.training.models import build_model
    from toolkit.analysis import stage_infos
    from toolkit.checkpoint import example_input
    from toolkit.dpfl import HEAD_CODECS, DPFLOptions, DPFLSetup, register_dpfl, round_seconds
    from toolkit.plan import choose_split, split_candidates

    register_dpfl()
    do = options or DPFLOptions()
    if not isinstance(do, DPFLOptions):
        raise UsageError(f"strategy_options: expected DPFLOptions, got {type(do).__name__}")
    if codec not in HEAD_CODECS:
        raise UsageError(f"--codec: dpfl sends its head whole, expected "
                         f"{' or '.join(HEAD_CODECS)}, got {codec}")
    infos = stage_infos(model if model is not None else build_model(cfg, allowed),
                        example_input(cfg))
    if len(infos) < 2:
        raise UsageError(f"dpfl: the model has {len(infos)} stage(s); a split needs two")
    cuts, shapes = {}, {}
    for p in fleet:
        cands = split_candidates(infos, p)
        c = choose_split(cands, do.split_after) if do.split_after else \
            min(cands, key=lambda c: (round_seconds(c, p), c.after))
        cuts[p.name], shapes[c.after] = c.after, tuple(c.act_shape)
    return DPFLSetup(cfg, cuts, shapes, do, allowed)


def _ecofed(options, codec: str, cfg: ModelConfig, fleet: list[DeviceProfile],
            public_x: np.ndarray, model, allowed: LocalModels):
    """EcoFed's setup: per profile the cut the planner picks among those whose head holds
    at most FROZEN_SHARE of the parameters (or the given one for all), each cut's head
    as ONNX; the latest cut is the frozen depth."""
    from toolkit.analysis import stage_infos
    from toolkit.checkpoint import example_input
    from toolkit.ecofed import ACT_CODECS, EcoFedOptions, EcoFedSetup, export_head
    from toolkit.plan import choose_split, split_candidates

    eo = options or EcoFedOptions()
    if not isinstance(eo, EcoFedOptions):
        raise UsageError(f"strategy_options: expected EcoFedOptions, got {type(eo).__name__}")
    try:
        eo.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    if codec not in ACT_CODECS:
        raise UsageError(f"--codec: ecofed sends activations, expected "
                         f"{' or '.join(ACT_CODECS)}, got {codec}")
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
            for p in fleet}
    after = max(cuts.values())  # the frozen depth; earlier cuts are bridged by the server
    heads = {c: export_head(model, cfg, c, public_x[:64]) for c in sorted(set(cuts.values()))}
    return EcoFedSetup(cfg, after, *heads[after], eo, cuts, heads, allowed)


def _reft(options, codec: str, cfg: ModelConfig, fleet: list[DeviceProfile],
          public_x: np.ndarray):
    """REFT's setup: MAC fractions per profile from the planner, the public split."""
    from device_runtime.training.models import build_model
    from toolkit.checkpoint import example_input
    from toolkit.plan import plan_fleet
    from toolkit.pruning import count_macs
    from toolkit.reft import LOGIT_CODECS, REFTOptions, REFTSetup, register_reft

    register_reft()
    ro = options or REFTOptions()
    if not isinstance(ro, REFTOptions):
        raise UsageError(f"strategy_options: expected REFTOptions, got {type(ro).__name__}")
    if ro.uplink not in ("weights", "logits"):
        raise UsageError(f"--reft-uplink: expected weights or logits, got {ro.uplink!r}")
    if ro.uplink == "logits" and codec not in LOGIT_CODECS:
        raise UsageError(f"--reft-uplink logits: expected --codec {', '.join(LOGIT_CODECS)}, "
                         f"got {codec}")
    if cfg.arch == "custom":  # its variants are zoo configs with pruned channel counts
        raise UsageError("reft: pruned variants need a zoo architecture, got a custom model")
    macs, params = count_macs(build_model(cfg), example_input(cfg))
    plans = plan_fleet(list({p.name: p for p in fleet}.values()), macs, params)
    fractions = {n: pl.compute_fraction for n, pl in plans.items()}
    for name, f in ro.fractions.items():
        if not isinstance(f, (int, float)) or isinstance(f, bool) or not 0 < f <= 1:
            raise UsageError(f"REFTOptions.fractions[{name!r}]: expected a MAC share in "
                             f"(0, 1], got {f!r}")
    return REFTSetup(cfg, public_x, {**fractions, **ro.fractions}, ro)


def _splitmix(options, cfg: ModelConfig, fleet: list[DeviceProfile]):
    """The ensemble's config, and budgets from the fleet's profiles unless given."""
    import dataclasses

    from broker_server.strategies.splitmix import SplitMixOptions
    from toolkit.splitmix import budgets_from_profiles, splitmix_config

    sm = options or SplitMixOptions()
    if not isinstance(sm, SplitMixOptions):
        raise UsageError(f"strategy_options: expected SplitMixOptions, got {type(sm).__name__}")
    if not sm.budgets and not sm.budget_by_profile:
        sm = dataclasses.replace(sm, budget_by_profile=budgets_from_profiles(fleet, sm.atom))
    if cfg.arch != "splitmix":
        return splitmix_config(cfg, sm.atom), sm
    if cfg.kwargs.get("bases") != sm.bases:  # a SplitMix checkpoint: its M must agree
        raise UsageError(f"--splitmix-atom: the checkpoint holds {cfg.kwargs.get('bases')} "
                         f"bases, the options ask for {sm.bases}")
    return cfg, sm


def _heterofl(options, cfg: ModelConfig, fleet: list[DeviceProfile]):
    """Nested width levels from the options' budgets, else from the fleet's profiles."""
    from broker_server.strategies.heterofl import HeteroFLOptions
    from toolkit.heterofl import heterofl_options
    from toolkit.splitmix import budgets_from_profiles

    ho = options or HeteroFLOptions()
    if not isinstance(ho, HeteroFLOptions):
        raise UsageError(f"strategy_options: expected HeteroFLOptions, got {type(ho).__name__}")
    if ho.levels:
        return ho
    by_profile = ho.width_by_profile or budgets_from_profiles(fleet, 0.125)
    return heterofl_options(cfg, by_profile, ho.widths)
