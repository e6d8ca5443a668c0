"""The server's own compute is part of a simulated round's time: measured per round
(``server_seconds``), added to the slowest device's time, and scaled to a stated server."""
import pytest

from toolkit.sim.server_time import add_server_time, host_gflops


def test_server_seconds_are_added_and_scaled():
    rounds = [{"round": 1, "server_seconds": 2.0}, {"round": 2, "server_seconds": 1.0},
              {"round": 3}]
    add_server_time(rounds, {1: 5.0, 2: 4.0, 3: 1.0}, host=10.0, server=100.0)
    assert [r["simulated_device_seconds"] for r in rounds] == [5.0, 4.0, 1.0]
    assert [r["simulated_seconds"] for r in rounds] == [7.0, 5.0, 1.0]
    assert [r["simulated_elapsed"] for r in rounds] == [7.0, 12.0, 13.0]
    assert [r["simulated_seconds_scaled"] for r in rounds] == [5.2, 4.1, 1.0]
    assert rounds[-1]["simulated_elapsed_scaled"] == pytest.approx(10.3)


def test_without_a_stated_server_nothing_is_scaled():
    rounds = [{"round": 1, "server_seconds": 2.0}]
    add_server_time(rounds, {1: 5.0}, host=None, server=0.0)
    assert "simulated_seconds_scaled" not in rounds[0]


def test_host_gflops_is_a_rate():
    assert host_gflops(n=128, reps=3) > 0


def test_a_simulated_round_counts_the_servers_compute():
    from toolkit.sim.simulate import SimOptions, run_simulation

    report, _ = run_simulation(SimOptions(devices=3, rounds=2, epochs=1,
                                          profiles=("rpi4",), server_gflops=1e6))
    for r in report["rounds"]:
        assert r["server_seconds"] > 0
        assert r["simulated_seconds"] == pytest.approx(
            r["simulated_device_seconds"] + r["server_seconds"], abs=2e-4)
        assert r["simulated_device_seconds"] <= r["simulated_seconds_scaled"] \
            < r["simulated_seconds"]
    assert report["server_scale"]["server_gflops"] == 1e6


def test_a_negative_server_rate_is_refused():
    from toolkit.errors import UsageError
    from toolkit.sim.simulate import SimOptions, check_options

    with pytest.raises(UsageError, match="--server-gflops: expected >= 0, got -1"):
        check_options(SimOptions(server_gflops=-1.0))
