"""Strategies by name: the one table of them, each a ``StrategySpec`` in its own module.

A strategy is declared by one spec (``spec.py``): its options and CLI flags, how the
server sets it up from a fleet and a model, its aggregation rule (a
``broker_server.strategies.Strategy`` subclass, named by import path so the numpy
rules stay torch-free and load only when used) and what ``fedge simulate`` reports
about it. The device side is chosen by the task's uplink kind
(``device_runtime.uplinks``). Adding a strategy is one module and one line
in ``TABLE`` (or one ``register`` call, e.g. from a test). Spec modules import
nothing heavy at load time: ``fedge --help`` reads every flag.
"""
from __future__ import annotations

import importlib

from device_runtime.registry import Registry
from toolkit.strategies.spec import ArgsContext, Flag, SetupContext, SimRun, StrategySpec

# name -> the module whose ``SPEC`` declares it
TABLE: Registry[str] = Registry("strategy")
TABLE.register("fedavg", "toolkit.strategies.fedavg")
TABLE.register("splitmix", "toolkit.strategies.splitmix")
TABLE.register("heterofl", "toolkit.strategies.heterofl")
TABLE.register("reft", "toolkit.strategies.reft")
TABLE.register("ecofed", "toolkit.strategies.ecofed")
TABLE.register("dpfl", "toolkit.strategies.dpfl")
TABLE.register("signsgd", "toolkit.strategies.signsgd")


def register(name: str, module: str) -> None:
    """Add a strategy: ``module`` (an import path) holds its ``SPEC``."""
    TABLE.register(name, module)


def names() -> list[str]:
    return TABLE.names()


def spec(name: str) -> StrategySpec:
    """The spec of strategy ``name`` alone (nothing else imported: the CLI's flags).
    An unknown name is a one-line error listing the valid ones."""
    module = TABLE.get(name)  # UnknownNameError: "unknown strategy 'x'; valid: ..."
    out = importlib.import_module(module).SPEC
    if not isinstance(out, StrategySpec):
        raise TypeError(f"{module}.SPEC: expected a StrategySpec, got {type(out).__name__}")
    return out


def get(name: str) -> StrategySpec:
    """The spec of strategy ``name``; its aggregation rule is then known to the
    aggregator by the same name (``broker_server.strategies.create``)."""
    from broker_server.strategies import STRATEGIES, register_path

    out = spec(name)
    if name not in STRATEGIES.names():
        register_path(name, out.rule)
    return out


def register_rules() -> None:
    """Make every strategy's rule known to the aggregator by name (a scale-out worker
    learns the strategy from the coordinator's round message)."""
    for name in names():
        get(name)


__all__ = ["ArgsContext", "Flag", "SetupContext", "SimRun", "StrategySpec", "TABLE", "get",
           "names", "register", "register_rules", "spec"]
