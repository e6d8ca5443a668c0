"""Adding a strategy is one module and one registration line: this file is the module (a
toy rule, its options, flag, setup and simulate hooks) and registers itself by one
``strategies.register`` call, then runs end to end in the simulator, through the real
aggregator, agents and CLI flag parsing, with nothing in the package edited."""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import pytest

from broker_server.strategies import Assignment, DeviceInfo, Strategy, Update
from broker_server.strategies.aggregate import weighted_average
from toolkit import strategies
from toolkit.strategies import ArgsContext, Flag, SetupContext, StrategySpec


@dataclass(frozen=True)
class ToyOptions:
    step: float = 1.0  # how far the global model moves toward the devices' mean
    trained: tuple[str, ...] = ()  # filled in by the setup: the fleet's profiles


class Toy(Strategy):
    """Every device trains the full model; the server moves ``step`` of the way to the
    plain (unweighted) mean of the updates."""

    name = "toy"

    def __init__(self, epochs: int = 1, batch_size: int = 32, lr: float = 0.05,
                 options: ToyOptions | None = None):
        self.opts = options or ToyOptions()
        self.epochs, self.batch_size, self.lr = epochs, batch_size, lr
        self.rounds: list[tuple[int, int]] = []  # (round, updates aggregated)

    def assign(self, round_: int, devices: list[DeviceInfo]) -> dict[str, Assignment]:
        return {d.id: Assignment("full", self.epochs, self.batch_size, self.lr)
                for d in devices}

    def aggregate(self, round_: int, global_weights, updates: list[Update]):
        self.rounds.append((round_, len(updates)))
        mean = weighted_average([(u.weights, 1) for u in updates])
        return {k: (global_weights[k] + self.opts.step * (mean[k] - global_weights[k]))
                .astype(global_weights[k].dtype) for k in global_weights}


def _from_args(args: argparse.Namespace, ctx: ArgsContext) -> ToyOptions:
    return ToyOptions(step=args.toy_step)


def _setup(options, ctx: SetupContext):
    o = options or ToyOptions()
    return ctx.cfg, ToyOptions(o.step, tuple(sorted({p.name for p in ctx.fleet})))


SPEC = StrategySpec(
    rule=f"{__name__}:Toy", options=ToyOptions,
    flags=(Flag(("--toy-step",), {"type": float, "default": 1.0}),),
    from_args=_from_args, setup=_setup,
    device_macs=lambda run: {a.device: run.macs // 2 for a in run.agents},
    report=lambda run: {"toy_rounds": run.strategy.rounds, "toy_trained": run.options.trained})


@pytest.fixture
def toy(monkeypatch):
    """The registration, undone after the test (the tables are process-wide)."""
    from broker_server.strategies import STRATEGIES

    monkeypatch.setattr(strategies.TABLE, "_items", dict(strategies.TABLE._items))
    monkeypatch.setattr(STRATEGIES, "_items", dict(STRATEGIES._items))
    strategies.register("toy", __name__)  # the one line that adds a strategy
    return strategies.get("toy")


def test_a_toy_strategy_registered_from_a_test_runs_end_to_end(toy):
    from toolkit.cli import strategy_args
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.sim.simulate import SimOptions, run_simulation

    p = argparse.ArgumentParser()
    p.add_argument("--strategy")
    strategy_args.add(p)  # every strategy's flags, the toy's among them
    args = p.parse_args(["--strategy", "toy", "--toy-step", "0.5"])
    opts = strategy_args.options(args, ProfileCatalogue.load(), ["rpi4"])
    assert opts == ToyOptions(step=0.5)

    report, ckpt = run_simulation(SimOptions(devices=3, rounds=2, strategy="toy", epochs=1,
                                             profiles=("rpi4", "rpi3b"), strategy_options=opts,
                                             round_timeout=120))
    assert report["toy_rounds"] == [(1, 3), (2, 3)]  # the toy's rule folded each round
    assert report["toy_trained"] == ("rpi3b", "rpi4")  # its setup saw the fleet
    full = report["devices"][0]["macs"] * 2
    assert [d["macs"] for d in report["devices"]] == [full // 2] * 3
    assert len(report["rounds"]) == 2 and 0 <= report["final_accuracy"] <= 1
    assert all(np.isfinite(p.detach().numpy()).all() for p in ckpt.model.parameters())


def test_an_unknown_strategy_names_the_valid_ones_on_one_line(toy):
    from device_runtime.registry import UnknownNameError

    with pytest.raises(UnknownNameError) as e:
        strategies.get("magic")
    assert str(e.value) == ("unknown strategy 'magic'; valid: "
                            + ", ".join(sorted([*strategies.names()])))
    assert "toy" in str(e.value) and "\n" not in str(e.value)


def test_each_built_in_strategy_is_registered_by_exactly_one_line():
    """One place: the toolkit's table names each strategy once; nothing else in the
    packages registers a strategy by name (the aggregator learns its rule from the spec)."""
    import re

    from testkit import ROOT

    lines = [line for pkg in ("toolkit", "broker_server", "device_runtime", "exporters")
             for f in (ROOT / pkg).rglob("*.py") for line in f.read_text().splitlines()
             if re.search(r"\bregister(_path)?\(\s*\"", line)]
    for name in strategies.names():
        assert sum(f'("{name}"' in line for line in lines) == 1, name
