"""The typed declaration of a strategy (``StrategySpec``) and what its hooks are given.

Every hook is optional: a spec with none is a strategy with no options, set up as
given, whose devices each train the whole model.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Flag:
    """One command-line flag: ``add_argument(*names, **kwargs)``. Strategies sharing a
    flag share the Flag object; the CLI adds it once, in a group named after them all."""

    names: tuple[str, ...]
    kwargs: dict = field(default_factory=dict)


# Shared by every strategy with a paper mode: its options as the paper publishes them
# (the options class's ``paper()``, documented in docs/ALGORITHMS.md, "Paper modes").
PAPER = Flag(("--paper",), {
    "action": "store_true",
    "help": "run the method as its paper publishes it, not fedge's tuned defaults "
            "(docs/ALGORITHMS.md, 'Paper modes'); flags given explicitly still win"})


def options_from(args: argparse.Namespace, cls: type, **given: Any):
    """``cls.paper()`` with ``--paper``, else ``cls()``, with each option in ``given``
    (field name = value from a flag) laid over it unless the value is None, the flag's
    "not given". A strategy with a paper mode gives its flags ``default=None`` for this."""
    base = cls.paper() if getattr(args, "paper", False) else cls()
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def checked_flags(options, flag_of: dict[str, str]):
    """``options`` after its ``check()``, whose ValueError becomes a UsageError led by
    the flag ``flag_of`` names for the option the message is about."""
    try:
        options.check()
    except ValueError as e:
        from toolkit.errors import UsageError

        raise UsageError(_led_by_flag(str(e), flag_of)) from None
    return options


def _led_by_flag(message: str, flag_of: dict[str, str]) -> str:
    """``message`` (an options check's: "[strategy ]option[...]: ...") with the option's
    flag in front, when ``flag_of`` knows it."""
    words = message.split(":", 1)[0].split("[", 1)[0].split()
    flag = flag_of.get(words[-1]) if words else None
    return f"{flag}: {message}" if flag else message


@dataclass(frozen=True)
class ArgsContext:
    """What the CLI knows when it turns flags into options."""

    catalogue: Any  # toolkit.planning.profiles.ProfileCatalogue
    profiles: list[str]  # the fleet's profile names
    devices: int = 0  # ``fedge simulate``: the number of devices (0: unknown)
    per_round: int = 0  # devices a round at least (simulate: all; serve: --min-devices)


@dataclass(frozen=True)
class SetupContext:
    """What the server knows when it sets a strategy up (``fedge serve``/``simulate``)."""

    cfg: Any  # ModelConfig of the checkpoint or the zoo
    fleet: list  # DeviceProfile per device
    public_x: np.ndarray  # the server's public split
    codec: str
    model: Any = None  # the pre-trained model, if any
    allowed: Any = None  # LocalModels: the operator's custom factories
    simulated: bool = False  # fedge simulate (its runs must repeat), not fedge serve


@dataclass(frozen=True)
class SimRun:
    """A finished ``fedge simulate`` run, for the MACs and report a strategy adds."""

    options: Any  # the strategy's options as set up
    strategy: Any  # the aggregator's Strategy instance
    model: Any  # the final torch model
    cfg: Any  # its ModelConfig
    macs: int  # the whole model's MACs per sample
    agents: list  # SimDevice per device
    fleet: list  # DeviceProfile per device (same order)
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class StrategySpec:
    """Everything about one strategy, in its own module (``SPEC``).

    ``rule``: "module:Class" of its aggregation rule (the aggregator knows it by the
    strategy's name once the toolkit registered it); ``options``: its options
    dataclass; ``flags``/``from_args``: its CLI flags and the options made from them
    (None: the defaults); ``setup``: the model config to train and the options filled
    in from the fleet; ``pretrain``: the model it starts from (simulate), if not a fresh
    one; ``device_macs``/``report``: per device MACs and report entries of a run;
    ``device_trains``: whether its devices train (need torch)."""

    rule: str
    options: type | str | None = None  # or its "module:Class" path (imported when used)
    flags: tuple[Flag, ...] = ()
    from_args: Callable[[argparse.Namespace, ArgsContext], object | None] | None = None
    setup: Callable[[object | None, SetupContext], tuple[Any, object | None]] | None = None
    pretrain: Callable[[Any, Any, np.ndarray, np.ndarray], Any] | None = None
    device_macs: Callable[[SimRun], dict[str, int]] | None = None
    report: Callable[[SimRun], dict] | None = None
    # False: its devices only run an exported model in onnxruntime (a bundle needs no torch)
    device_trains: bool = True


def checked_options(options: object | None, cls: type):
    """``options`` if given as ``cls`` (its defaults if None), else a UsageError."""
    from toolkit.errors import UsageError

    out = options if options is not None else cls()
    if not isinstance(out, cls):
        raise UsageError(f"strategy_options: expected {cls.__name__}, got "
                         f"{type(out).__name__}")
    return out
