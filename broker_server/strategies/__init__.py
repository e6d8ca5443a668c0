"""The aggregator's strategies by name: name -> the import path of its ``Strategy`` class.

Every strategy is registered once, by its spec in the toolkit's one table
(``toolkit.strategies``): the spec's ``rule`` path lands here under the strategy's
name when the toolkit sets up a job (``toolkit.strategies.get`` / ``register_rules``).
The torch-free rules live in this package; a class is imported when first created,
never at registration. A factory
takes the job's local-training options (epochs, batch_size, lr) and ``options``,
and returns a fresh strategy instance.
"""
from __future__ import annotations

from typing import Callable

from broker_server.strategies.base import Assignment, DeviceInfo, Strategy, Update
from broker_server.strategies.fedavg import FedAvg, FedAvgOptions
from broker_server.strategies.heterofl import HeteroFL, HeteroFLOptions
from broker_server.strategies.signsgd import SignSGD, SignSGDOptions
from broker_server.strategies.splitmix import SplitMix, SplitMixOptions
from device_runtime.registry import Registry

StrategyFactory = Callable[..., Strategy]
STRATEGIES: Registry[StrategyFactory | str] = Registry("strategy")


def register(name: str, factory: StrategyFactory) -> StrategyFactory:
    return STRATEGIES.register(name, factory)


def register_path(name: str, path: str) -> None:
    """Register ``name`` by the "module:attribute" path of its factory (lazy)."""
    STRATEGIES.register(name, path)


def factory(name: str) -> StrategyFactory:
    """The factory of strategy ``name``, imported on first use."""
    return STRATEGIES.load(name)


def create(name: str, **options) -> Strategy:
    return factory(name)(**options)


__all__ = ["Assignment", "DeviceInfo", "Strategy", "Update", "register", "register_path",
           "create", "factory", "STRATEGIES", "FedAvg", "FedAvgOptions", "HeteroFL",
           "HeteroFLOptions", "SignSGD", "SignSGDOptions", "SplitMix", "SplitMixOptions"]
