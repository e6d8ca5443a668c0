"""``fedge simulate --broker URL --procs K``: devices in worker processes, each its own
MQTT client on a real Mosquitto; the same report as one process, plus fleet figures."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from testkit.brokers import mosquitto_binary
from tests.conftest import assert_one_line_error, run_fedge

needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None,
                                     reason="mosquitto is not installed")
SMALL = ["--devices", "6", "--rounds", "2", "--model", "cnn", "--width", "0.25",
         "--codec", "fedmrn", "--epochs", "1", "--profiles", "rpi4,rpi5"]


@pytest.mark.slow
def test_procs_usage_errors(tmp_path):
    code, _, err = run_fedge("simulate", *SMALL, "--procs", "0", "--json", str(tmp_path / "a"))
    assert_one_line_error(code, err, 2, "--procs")
    code, _, err = run_fedge("simulate", *SMALL, "--procs", "2", "--json", str(tmp_path / "b"))
    assert_one_line_error(code, err, 2, "--procs 2", "--broker")
    code, _, err = run_fedge("simulate", *SMALL[2:], "--devices", "1000", "--procs", "2",
                             "--broker", "mqtt://127.0.0.1:1", "--json", str(tmp_path / "c"))
    assert_one_line_error(code, err, 2, "500 MQTT clients", "--procs 4")


def test_broker_throughput_without_sys_counters_says_why():
    """No $SYS samples (amqtt, or Mosquitto without sys_interval): the report's nulls
    come with the reason, not as if the broker had carried nothing."""
    from toolkit.sim.fleetstats import NO_SYS, FleetMeter

    meter = FleetMeter(None, None)
    meter({"round": 1, "seconds": 1.0, "uplink_bytes": 10, "downlink_bytes": 20})
    out = meter.finish()
    assert out["broker_job"] == {} and out["broker_note"] == NO_SYS
    assert meter.records[0]["broker_bytes_received_per_s"] is None


def test_top_up_gives_every_device_of_a_big_fleet_samples():
    from toolkit.model.partition import dirichlet_split

    labels = np.repeat(np.arange(10), 360)
    parts = dirichlet_split(labels, 1000, 0.5, seed=0, min_samples=2, top_up=True)
    assert min(len(p) for p in parts) >= 2
    every = np.concatenate(parts)
    assert len(every) == len(labels) == len(np.unique(every))  # a partition: no loss, no copy
    with pytest.raises(Exception, match="no Dirichlet"):
        dirichlet_split(labels, 1000, 0.5, seed=0, min_samples=2, max_tries=2)


@pytest.mark.slow
@needs_mosquitto
def test_procs_2_report_matches_one_process(tmp_path, mosquitto):
    from toolkit.sim.simulate import SimOptions, run_simulation

    out = tmp_path / "fleet.json"
    code, _, err = run_fedge("simulate", *SMALL, "--broker", mosquitto.url, "--procs", "2",
                             "--json", str(out))
    assert code == 0, err
    fleet = json.loads(out.read_text())
    one, _ = run_simulation(SimOptions(devices=6, rounds=2, model="cnn", width=0.25,
                                       codec="fedmrn", epochs=1, profiles=("rpi4", "rpi5"),
                                       broker=mosquitto.url))
    assert set(one) <= set(fleet) and set(fleet) - set(one) == {"fleet"}
    assert [d["id"] for d in fleet["devices"]] == [f"dev-{k}" for k in range(6)]
    for a, b in zip(one["devices"], fleet["devices"]):
        assert set(a) == set(b)
        assert (a["id"], a["profile"], a["samples"], a["rounds_trained"]) == \
            (b["id"], b["profile"], b["samples"], b["rounds_trained"]) == \
            (a["id"], a["profile"], a["samples"], 2)
        # Same frames; the task's deadline and the update's loss differ by a few digits.
        assert abs(a["uplink_bytes"] - b["uplink_bytes"]) < 0.02 * a["uplink_bytes"]
        assert abs(a["downlink_bytes"] - b["downlink_bytes"]) < 0.02 * a["downlink_bytes"]
    assert 0 <= fleet["final_accuracy"] <= 1 and len(fleet["rounds"]) == 2
    rec = fleet["rounds"][-1]
    assert rec["aggregator_cpu_seconds"] > 0 and rec["aggregator_rss_mb"] > 0
    assert rec["frame_bytes_per_s"] > 0 and "broker_bytes_sent_per_s" in rec
    assert fleet["fleet"]["procs"] == 2 and len(fleet["fleet"]["workers"]) == 2
    assert sum(w["devices"] for w in fleet["fleet"]["workers"]) == 6


def _simworkers() -> list[int]:
    """This process's ``toolkit.sim.simworker`` children (from /proc: no extra package)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"toolkit.sim.simworker" in cmd:
            pids.append(int(d.name))
    return pids


@pytest.mark.slow
@needs_mosquitto
def test_a_dead_device_process_fails_the_run_instead_of_hanging(mosquitto):
    from toolkit.errors import SimulationError
    from toolkit.sim.simulate import SimOptions, run_simulation

    def kill_one(rec: dict) -> None:
        if rec["round"] == 1:
            os.kill(_simworkers()[0], signal.SIGKILL)

    with pytest.raises(SimulationError, match=r"device process \d .*exited with code -9"):
        # round_timeout is long: only the watch on the workers can end this quickly.
        run_simulation(SimOptions(devices=2, rounds=3, model="cnn", width=0.25, epochs=1,
                                  broker=mosquitto.url, procs=2, round_timeout=300),
                       on_round=kill_one)
    assert _simworkers() == []  # the other worker was stopped too
