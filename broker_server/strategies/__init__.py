"""Strategies by name. ``register(name, factory)`` adds one; built-ins are registered here.

A factory takes the job's local-training options (epochs, batch_size, lr) and
returns a fresh strategy instance.
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
STRATEGIES: Registry[StrategyFactory] = Registry("strategy")


def register(name: str, factory: StrategyFactory) -> StrategyFactory:
    return STRATEGIES.register(name, factory)


def create(name: str, **options) -> Strategy:
    return STRATEGIES.get(name)(**options)


register("fedavg", FedAvg)
register("signsgd", SignSGD)
register("splitmix", SplitMix)
register("heterofl", HeteroFL)

__all__ = ["Assignment", "DeviceInfo", "Strategy", "Update", "register", "create",
           "STRATEGIES", "FedAvgOptions", "HeteroFLOptions", "SignSGDOptions",
           "SplitMixOptions"]
