"""Devices simulated in one process share its cores: at most as many train at once as
the process may use (``AgentOptions.compute``); a device of its own is not limited."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import pytest

from device_runtime import threads
from device_runtime.training import work
from testkit.timing import scaled
from toolkit.sim.simulate import SimOptions, run_simulation

OPTS = SimOptions(devices=3, rounds=1, epochs=1, dataset="mnist1d:1000", profiles=("rpi4",),
                  threads=1)


@contextmanager
def counting_training(monkeypatch, wait_for: int, patience: float):
    """train_local that records how many run at once; each waits (bounded) until
    ``wait_for`` are training, so that devices that may overlap do overlap."""
    state = {"now": 0, "peak": 0}
    cond = threading.Condition()
    real = work.train_local

    def train(*args, **kwargs):
        with cond:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            cond.notify_all()
            cond.wait_for(lambda: state["now"] >= wait_for, timeout=scaled(patience))
        try:
            return real(*args, **kwargs)
        finally:
            with cond:
                state["now"] -= 1

    monkeypatch.setattr(work, "train_local", train)
    yield state


# With one core a device waits a little for others that never join it; with three, as
# long as it takes for all three to be training together.
@pytest.mark.parametrize("cores, peak, patience", [(1, 1, 0.3), (3, 3, 60.0)])
def test_simulated_devices_train_at_most_as_many_at_once_as_the_cores(monkeypatch, cores,
                                                                      peak, patience):
    # Ten cnn-wide devices training at once on two cores spent about 5% more CPU than
    # two at a time (docs/results/vs_flower_speed.md).
    monkeypatch.setattr(threads, "available_cpus", lambda *a, **k: cores)
    with counting_training(monkeypatch, 3, patience) as state:
        report, _ = run_simulation(OPTS)
    assert report["rounds"][0]["devices_reporting"] == 3
    assert state["peak"] == peak


def test_a_device_of_its_own_computes_without_a_slot():
    from device_runtime.agent import AgentOptions

    assert AgentOptions("job", "dev-0", "rpi4").compute is None
