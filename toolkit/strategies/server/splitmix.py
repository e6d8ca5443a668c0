"""SplitMix on the server side: the ensemble's model config, budgets from device profiles,
and accuracy per width (the first k bases).

The strategy itself (sampler, per-base averaging) is ``broker_server.strategies.splitmix``;
the bases are built by ``device_runtime.training.splitmix``.
"""
from __future__ import annotations

import math

import numpy as np

from device_runtime.training.models import ModelConfig
from device_runtime.training.splitmix import SplitMixNet
from toolkit.errors import UsageError
from toolkit.planning.profiles import DeviceProfile


def splitmix_config(cfg: ModelConfig, atom: float, tricks: dict | None = None
                    ) -> ModelConfig:
    """M = 1 / atom bases of ``cfg``'s architecture, each at width ``cfg.width * atom``;
    ``tricks``: the width tricks and BatchNorm choice that are on
    (``SplitMixOptions.model_kwargs``)."""
    if cfg.arch in ("splitmix", "custom"):
        raise UsageError(f"splitmix: bases need a zoo architecture, got {cfg.arch!r}")
    m = int(round(1 / atom))
    return cfg.replace(arch="splitmix", width=cfg.width * atom,
                       kwargs={"base": cfg.arch, "bases": m, **(tricks or {})})


def budgets_from_profiles(profiles: list[DeviceProfile], atom: float,
                          ram_fraction: float = 0.25, bytes_per_base: int = 0
                          ) -> dict[str, float]:
    """Width budget per profile: the width of the single network its compute affords,
    sqrt(compute / strongest compute) since a width-w network costs about w^2 of the
    full one's MACs; capped by the bases its training memory holds (``bytes_per_base``
    of parameters, gradients and momentum), never below one base."""
    top = max(p.gflops for p in profiles)
    out = {}
    for p in profiles:
        budget = math.sqrt(p.gflops / top)
        if bytes_per_base:
            fits = int(p.ram_mb * 1e6 * ram_fraction // bytes_per_base)
            budget = min(budget, fits * atom)
        out[p.name] = round(max(atom, min(1.0, budget)), 6)
    return out


def width_accuracy(model: SplitMixNet, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Test accuracy of the first k bases, k = 1..M (logits averaged)."""
    from toolkit.model.train import accuracy

    return {str(k): round(accuracy(model.first(k), x, y), 4)
            for k in range(1, len(model.indices) + 1)}
