"""The server's own compute is part of a simulated round's time: its torch work
counted in FLOPs (the same on every run) at a stated server's rate, and beside it the
wall seconds measured here (``server_seconds``)."""
import pytest
import torch
from torch import nn

from broker_server import compute
from toolkit.sim.server_time import add_server_time
from toolkit.strategies.server.flops import counted, shape_key


def test_counted_and_measured_server_time_are_added_to_the_devices():
    rounds = [{"round": 1, "server_flops": 4_000_000_000, "server_seconds": 2.0},
              {"round": 2, "server_flops": 1_000_000_000, "server_seconds": 1.0},
              {"round": 3}]
    add_server_time(rounds, {1: 5.0, 2: 4.0, 3: 1.0}, server_gflops=2.0)
    assert [r["simulated_device_seconds"] for r in rounds] == [5.0, 4.0, 1.0]
    assert [r["simulated_server_seconds"] for r in rounds] == [2.0, 0.5, 0.0]
    assert [r["simulated_seconds"] for r in rounds] == [7.0, 4.5, 1.0]
    assert [r["simulated_elapsed"] for r in rounds] == [7.0, 11.5, 12.5]
    assert [r["simulated_seconds_measured"] for r in rounds] == [7.0, 5.0, 1.0]
    assert rounds[-1]["simulated_elapsed_measured"] == pytest.approx(13.0)


def test_a_step_is_watched_once_and_counted_every_time():
    lin = nn.Linear(64, 10)
    x = torch.randn(32, 64)
    key = shape_key("infer", lin, x.shape)
    before = compute.total()
    with torch.no_grad():
        counted(key, lambda: lin(x))
        first = compute.total() - before
        counted(key, lambda: lin(x))
    assert first == 2 * 32 * 64 * 10  # one multiply-add per weight per sample
    assert compute.total() - before == 2 * first
    # Another shape is another count.
    assert shape_key("infer", lin, (16, 64)) != key


def test_a_simulated_reft_round_counts_its_distillation_the_same_every_run():
    from toolkit.sim.simulate import SimOptions, run_simulation

    opts = SimOptions(strategy="reft", dataset="mnist1d:1000", devices=3, rounds=2,
                      epochs=1, profiles=("rpi4", "jetson-orin-nano"), threads=1,
                      server_gflops=50.0)
    a, _ = run_simulation(opts)
    b, _ = run_simulation(opts)
    for r in a["rounds"]:
        assert r["server_flops"] > 0 and r["server_seconds"] > 0
        assert r["simulated_seconds"] == pytest.approx(
            r["simulated_device_seconds"] + r["server_flops"] / 50e9, abs=2e-4)
    keys = ("server_flops", "simulated_seconds", "simulated_elapsed")
    assert [{k: r[k] for k in keys} for r in a["rounds"]] == \
        [{k: r[k] for k in keys} for r in b["rounds"]]
    assert a["server_gflops"] == 50.0


def test_fedavg_trains_nothing_on_the_server():
    from toolkit.sim.simulate import SimOptions, run_simulation

    report, _ = run_simulation(SimOptions(devices=3, rounds=1, epochs=1,
                                          dataset="mnist1d:1000", profiles=("rpi4",)))
    r = report["rounds"][0]
    assert r["server_flops"] == 0
    assert r["simulated_seconds"] == r["simulated_device_seconds"]
    assert r["simulated_seconds_measured"] >= r["simulated_device_seconds"]


@pytest.mark.parametrize("rate", [0.0, -1.0])
def test_a_server_rate_that_is_not_positive_is_refused(rate):
    from toolkit.errors import UsageError
    from toolkit.sim.simulate import SimOptions, check_options

    with pytest.raises(UsageError, match=f"--server-gflops: expected > 0, got {rate}"):
        check_options(SimOptions(server_gflops=rate))


def test_dpfl_counts_the_tail_steps_it_takes_for_the_devices():
    # Split learning trains the tail on every device batch on the server: before, none
    # of that was in the server's time.
    from toolkit.sim.simulate import SimOptions, run_simulation

    report, _ = run_simulation(SimOptions(strategy="dpfl", dataset="mnist1d:1000", devices=3,
                                          rounds=1, epochs=1, threads=1,
                                          profiles=("rpi4", "jetson-orin-nano")))
    assert report["rounds"][0]["server_flops"] > 0
