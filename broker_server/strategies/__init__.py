"""The aggregator's strategies by name: name -> the import path of its ``Strategy`` class.

Torch-free rules are listed here; the toolkit adds the server-trained ones (reft,
ecofed, dpfl need torch) from their specs (``toolkit.strategies``) under the same
names. A class is imported when first created, never at registration. A factory
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
STRATEGIES.register("fedavg", "broker_server.strategies.fedavg:FedAvg")
STRATEGIES.register("signsgd", "broker_server.strategies.signsgd:SignSGD")
STRATEGIES.register("splitmix", "broker_server.strategies.splitmix:SplitMix")
STRATEGIES.register("heterofl", "broker_server.strategies.heterofl:HeteroFL")


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
