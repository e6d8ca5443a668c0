"""Faults with real processes and a real Mosquitto: killed devices, a killed
aggregator, a restarted broker. Every run must complete, with no round repeated
or skipped and no accepted update lost."""
from __future__ import annotations

import json
import queue
import secrets

import pytest

from broker_server.update_log import read_log
from device_runtime.transport.mqtt import MqttTransport
from testkit.field import (
    completed_rounds,
    finish,
    prepare_job,
    sigkill,
    start_device,
    start_server,
    wait_for,
)
from testkit.timing import scaled

pytestmark = pytest.mark.slow  # real fedge processes against a real broker, end to end


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("field")
    return work, prepare_job(work, devices=4)


@pytest.fixture
def broker(mosquitto):
    return mosquitto


def _work(tmp_path, job_files):
    work = tmp_path / "run"
    work.mkdir()
    (work / "data").symlink_to(job_files[0] / "data")
    (work / "keys").symlink_to(job_files[0] / "keys")
    return work, job_files[1]


def _report(work):
    return json.loads((work / "report.json").read_text())


def test_device_killed_mid_round_closes_at_the_deadline_with_quorum(tmp_path, job_files, broker):
    work, ckpt = _work(tmp_path, job_files)
    job = f"kill-{secrets.token_hex(3)}"
    watch = MqttTransport(broker.url, "watcher")
    watch.connect()
    tasks: queue.Queue = queue.Queue()
    watch.subscribe(f"fedge/{job}/round/2/task/dev-3", lambda t, p: tasks.put(p))
    devices = [start_device(broker.url, job, work, k) for k in range(4)]
    server = start_server(broker.url, job, work, ckpt, rounds=3, min_devices=3,
                          round_timeout=scaled(4.0))
    tasks.get(timeout=scaled(120))  # dev-3 has its round-2 task: kill it before it can answer
    sigkill(devices[3])
    assert finish([server, *devices[:3]], timeout=120) == [0, 0, 0, 0]
    watch.close()
    rounds = _report(work)["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    r2 = rounds[1]
    assert r2["devices_assigned"] == 4 and r2["devices_reporting"] == 3
    assert "dev-3" not in r2["accepted"] and r2["seconds"] >= 4.0


def test_aggregator_killed_and_restarted_resumes_without_loss(tmp_path, job_files, broker):
    work, ckpt = _work(tmp_path, job_files)
    job = f"agg-{secrets.token_hex(3)}"
    devices = [start_device(broker.url, job, work, k) for k in range(3)]
    server = start_server(broker.url, job, work, ckpt, rounds=4, min_devices=3,
                          round_timeout=scaled(20.0))
    log = work / "state" / "round-3.log"
    wait_for(lambda: completed_rounds(work) >= 2 and log.exists() and
             read_log(log).records, 180, "an update in round 3")
    sigkill(server)
    saved = sorted(device for device, _ in read_log(log).records)
    assert completed_rounds(work) == 2 and saved
    server = start_server(broker.url, job, work, ckpt, rounds=4, min_devices=3,
                          round_timeout=scaled(20.0))
    assert finish([server, *devices], timeout=180) == [0, 0, 0, 0]
    report = _report(work)
    assert report["resumed_from"] == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert set(saved) <= set(report["rounds"][2]["accepted"])
    assert all(r["devices_reporting"] == 3 for r in report["rounds"])


def test_broker_restart_everyone_reconnects_and_the_run_completes(tmp_path, job_files, broker):
    work, ckpt = _work(tmp_path, job_files)
    job = f"brk-{secrets.token_hex(3)}"
    devices = [start_device(broker.url, job, work, k) for k in range(3)]
    server = start_server(broker.url, job, work, ckpt, rounds=4, min_devices=3,
                          round_timeout=scaled(10.0))
    wait_for(lambda: completed_rounds(work) >= 1, 180, "round 1")
    broker.restart(down_seconds=1.5)
    assert finish([server, *devices], timeout=240) == [0, 0, 0, 0]
    report = _report(work)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    assert report["final_accuracy"] > 0.3
