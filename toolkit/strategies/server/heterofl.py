"""HeteroFL on the server side: the nested widths' configs and shapes, and the width
levels a fleet's budgets pick (the strategy is ``broker_server.strategies.heterofl``).

Also the two plain-FedAvg baselines of the heterogeneous benchmark: the widest model
every device can train (the smallest common model) and the profiles that can train
the full model.
"""
from __future__ import annotations

import math

from broker_server.strategies.heterofl import HeteroFLOptions
from device_runtime.training.local import weights_of
from device_runtime.training.models import ARCHS, ModelConfig, build_model
from toolkit.errors import UsageError


def snap_width(budget: float, grid: float) -> float:
    """The largest multiple of ``grid`` that is <= budget (at least one grid step)."""
    return max(grid, math.floor(budget / grid + 1e-9) * grid)


def heterofl_options(cfg: ModelConfig, width_by_profile: dict, widths: dict | None = None,
                     grid: float = 0.125) -> HeteroFLOptions:
    """One level per distinct snapped budget (and always full width), each with the
    config a device builds and the tensor shapes, checked to be blocks of the full model's."""
    if cfg.arch not in ARCHS or cfg.kwargs.get("channels"):
        raise UsageError(f"heterofl: nested widths need a zoo architecture at its own "
                         f"widths, got {cfg.arch!r}")
    full = {k: v.shape for k, v in weights_of(build_model(cfg)).items()}
    snapped = {p: round(snap_width(b, grid), 6) for p, b in width_by_profile.items()}
    per_device = {d: round(snap_width(b, grid), 6) for d, b in (widths or {}).items()}
    levels = {}
    for w in sorted({1.0, *snapped.values(), *per_device.values()}):
        wcfg = cfg.replace(width=cfg.width * w)
        shapes = {k: tuple(v.shape) for k, v in weights_of(build_model(wcfg)).items()}
        for k, s in shapes.items():
            if k not in full or len(s) != len(full[k]) or any(a > b for a, b in zip(s, full[k])):
                raise UsageError(f"heterofl: {k} at width {w:g} is not a block of the full "
                                 "model's tensor")
        levels[f"{w:g}"] = {"model": wcfg.to_json(), "tensors": {k: list(s) for k, s in
                                                                  shapes.items()}}
    return HeteroFLOptions(levels, width_by_profile=snapped, widths=per_device)


def common_width(width_by_profile: dict, grid: float = 0.125) -> float:
    """The smallest common model: the width the weakest budget affords."""
    return snap_width(min(width_by_profile.values()), grid)


def full_width_profiles(width_by_profile: dict) -> tuple[str, ...]:
    """The profiles whose budget affords the full model."""
    return tuple(p for p, b in sorted(width_by_profile.items()) if b >= 1.0 - 1e-9)
