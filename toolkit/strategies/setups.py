"""Server-side strategy setup, shared by ``fedge simulate``, ``fedge serve`` and
``fedge bundle``: the name checked, and the typed options filled in from the fleet
and the model by the strategy's own spec (``toolkit.strategies``)."""
from __future__ import annotations

import numpy as np

from device_runtime.local_models import NO_CUSTOM, LocalModels
from device_runtime.training.models import ModelConfig
from toolkit.planning.profiles import DeviceProfile


def check_strategy(name: str) -> None:
    """An unknown ``name`` is a one-line error listing the valid names; a known one's
    aggregation rule is then known to the aggregator (``toolkit.strategies.get``)."""
    from toolkit import strategies

    strategies.get(name)


def setup_strategy(strategy: str, cfg: ModelConfig, fleet: list[DeviceProfile],
                   public_x: np.ndarray, codec: str, options: object | None,
                   model=None, allowed: LocalModels = NO_CUSTOM, simulated: bool = False
                   ) -> tuple[ModelConfig, object | None]:
    """The model config the job trains and the strategy's options (``options`` filled in
    from the fleet where the user left them out). ``model``: the pre-trained model
    (EcoFed freezes its head); ``allowed``: the custom factories the operator named, for
    the strategies that rebuild ``cfg`` on the server (dpfl, ecofed); ``simulated``:
    for fedge simulate, whose runs must repeat (dpfl's lockstep)."""
    from toolkit import strategies

    spec = strategies.get(strategy)
    if spec.setup is None:
        return cfg, options
    return spec.setup(options, strategies.SetupContext(cfg, fleet, public_x, codec, model,
                                                       allowed, simulated))
