"""`fedge serve --workers 2` in the field: real serve, worker and device processes on a
real Mosquitto reach the same models as `fedge serve` alone, also when a worker is
killed mid-round; usage mistakes are one line."""
from __future__ import annotations

import json
import os
import queue
import secrets
import signal
import threading
from pathlib import Path

import numpy as np
import pytest

from device_runtime import wire
from device_runtime.topics import Topics
from device_runtime.transport.mqtt import MqttTransport

from testkit.brokers import Mosquitto
from tests.conftest import assert_one_line_error, run_fedge
from testkit.field import finish, prepare_job, start_device, start_server
from testkit.timing import scaled

pytestmark = pytest.mark.slow  # fedge processes over Mosquitto; a subprocess per mistake

DEVICES = 3


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("workers-job")
    return work, prepare_job(work, devices=DEVICES)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq-workers-field")).start()
    yield m
    m.stop()


@pytest.fixture(scope="module")
def alone(tmp_path_factory, job_files, broker):
    """`fedge serve` without workers, the reference (with the coded downlink)."""
    return _job(tmp_path_factory.mktemp("alone"), job_files, broker.url, "alone",
                ["--downlink", "fedmrn"])


def _job(tmp_path, job_files, url: str, name: str, extra: list[str],
         job: str | None = None) -> tuple[dict, dict]:
    work = tmp_path / name
    work.mkdir()
    (work / "data").symlink_to(job_files[0] / "data")
    (work / "keys").symlink_to(job_files[0] / "keys")
    job = job or f"wf{secrets.token_hex(3)}"
    server = start_server(url, job, work, job_files[1], rounds=2, min_devices=DEVICES,
                          round_timeout=scaled(60), extra=["--codec", "fedmrn", "--eval-data",
                                                   str(work / "data" / "server.npz"), *extra])
    devices = [start_device(url, job, work, k) for k in range(DEVICES)]
    codes = finish([server], timeout=240) + finish(devices, timeout=60)
    assert codes == [0] * (1 + DEVICES), (work / "server.log").read_text()[-3000:]
    report = json.loads((work / "report.json").read_text())
    return report, wire.decode((work / "state" / "global-2.fdg").read_bytes()).tensors


def test_serve_with_two_workers_reaches_the_same_model(tmp_path, job_files, broker, alone):
    # With the coded downlink, so round 2's fold is relative to the model devices rebuilt
    # from the sync frame, which the workers read from the broker.
    alone, model_alone = alone
    spread, model_spread = _job(tmp_path, job_files, broker.url, "spread",
                                ["--workers", "2", "--downlink", "fedmrn"])
    # Devices train deterministically from the task seed, and FedMRN's mean is integer
    # mask counts plus float64 sums: the same weights (biases and BN parameters up to
    # float32 rounding, which the sums merged in another order may differ by).
    assert model_spread.keys() == model_alone.keys()
    for name, value in model_alone.items():
        np.testing.assert_array_max_ulp(model_spread[name], value, maxulp=1)
    assert [r["accuracy"] for r in spread["rounds"]] == [r["accuracy"] for r in alone["rounds"]]
    assert [r["devices_reporting"] for r in spread["rounds"]] == [DEVICES, DEVICES]
    assert not spread["rejected"]
    scale = spread["scale_out"]
    assert sum(scale["updates_by_worker"].values()) == 2 * DEVICES, scale
    assert len(scale["rounds"]) == 2
    # The exactly-once evidence names every merged update once, as without workers.
    for r in spread["rounds"]:
        assert r["folded"] == len(r["updates"]) == DEVICES, r
        assert sorted(d for d, _ in r["updates"]) == r["accepted"]
    down = [r["downlink_bytes"] for r in spread["rounds"]]
    assert down[1] < down[0] / 5, down  # round 2: the change, not the model


def _worker_pid(job: str, worker: str) -> int | None:
    """The pid of ``fedge worker --job JOB --id WORKER`` (started by fedge serve)."""
    for proc in Path("/proc").iterdir():
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if "worker" in words and f"--job {job} --id {worker}" in " ".join(words):
            return int(proc.name)
    return None


def test_a_worker_killed_mid_round_is_restarted_and_loses_nothing(tmp_path, job_files,
                                                                   broker, alone):
    job = f"wk{secrets.token_hex(3)}"
    reports: queue.Queue = queue.Queue()
    spy = MqttTransport(broker.url, f"spy-{job}")
    spy.connect()
    spy.subscribe(Topics(job).worker("+", "accepted"), lambda t, p: reports.put(t))
    killed: list[str] = []

    def kill_first_reporter() -> None:  # SIGKILL: no clean disconnect, the will fires
        topic = reports.get(timeout=scaled(200))
        worker = topic.split("/")[-2]
        pid = _worker_pid(job, worker)
        assert pid is not None, topic
        os.kill(pid, signal.SIGKILL)
        killed.append(worker)

    killer = threading.Thread(target=kill_first_reporter, daemon=True)
    killer.start()
    try:
        report, model = _job(tmp_path, job_files, broker.url, "killed",
                             ["--workers", "2", "--downlink", "fedmrn"], job=job)
    finally:
        spy.close()
    killer.join(scaled(5))
    assert killed, "no worker reported an update"
    # The killed worker's update, accepted and reported before the kill, is still in
    # round 1: the restarted worker reloaded it from its state dir and sent it in its
    # partial. So every device counts and the model is the one serve alone made.
    assert [r["devices_reporting"] for r in report["rounds"]] == [DEVICES, DEVICES]
    assert report["scale_out"]["restarts"] == 1, report["scale_out"]
    for name, value in alone[1].items():
        np.testing.assert_array_max_ulp(model[name], value, maxulp=1)
    for r in report["rounds"]:
        assert r["folded"] == len(r["updates"]) == DEVICES, r
    log = (tmp_path / "killed" / "server.log").read_text()
    assert f"worker {killed[0]} (pid" in log and "restarting in" in log


def test_workers_usage_mistakes_are_one_line(tmp_path, job_files):
    base = ["serve", "--job", "j", "--checkpoint", str(job_files[1]), "--state-dir",
            str(tmp_path / "s")]
    code, _, err = run_fedge(*base, "--workers", "0", "--broker", "mqtt://127.0.0.1:1")
    assert_one_line_error(code, err, 2, "--workers: expected >= 1, got 0")
    code, _, err = run_fedge(*base, "--workers", "2")
    assert_one_line_error(code, err, 2, "--workers needs --broker", "shared subscriptions")
    code, _, err = run_fedge(*base, "--workers", "2", "--broker", "mqtt://127.0.0.1:1",
                             "--strategy", "signsgd", "--codec", "sign")
    assert_one_line_error(code, err, 2, "signsgd with --codec sign cannot be split",
                          "valid: fedavg with --codec fp32")
    code, _, err = run_fedge(*base, "--workers", "2", "--broker", "mqtt://127.0.0.1:1",
                             "--max-payload", "50000")
    assert_one_line_error(code, err, 2, "over --max-payload 50000", "chunks")
    code, _, err = run_fedge("worker", "--broker", "mqtt://127.0.0.1:1", "--job", "j",
                             "--id", "round", "--state-dir", str(tmp_path / "w"))
    assert_one_line_error(code, err, 2, "worker id: 'round' is reserved")
