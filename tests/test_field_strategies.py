"""Heterogeneous strategies in the field: real `fedge serve` and `fedge device` processes
on a real Mosquitto, a weak and a strong device each training what it can afford."""
from __future__ import annotations

import json
import secrets

import pytest

from tests.conftest import assert_one_line_error, run_fedge
from testkit.field import finish, prepare_job, start_device, start_server
from testkit.timing import scaled

pytestmark = pytest.mark.slow  # fedge processes over Mosquitto; a subprocess per mistake

PROFILES = ["rpi3b", "jetson-orin-nano"]


@pytest.fixture(scope="module")
def job_files(tmp_path_factory):
    work = tmp_path_factory.mktemp("hetero")
    return work, prepare_job(work, devices=2)


def _run(tmp_path, job_files, mosquitto, extra: list[str]) -> dict:
    work = tmp_path / "run"
    work.mkdir()
    (work / "data").symlink_to(job_files[0] / "data")
    (work / "keys").symlink_to(job_files[0] / "keys")
    job = f"h{secrets.token_hex(3)}"
    server = start_server(mosquitto.url, job, work, job_files[1], rounds=2, min_devices=2,
                          round_timeout=scaled(60), extra=["--profiles", ",".join(PROFILES),
                                                   "--eval-data",
                                                   str(work / "data" / "server.npz"), *extra])
    devices = [start_device(mosquitto.url, job, work, k, PROFILES[k]) for k in range(2)]
    codes = finish([server], timeout=240) + finish(devices, timeout=60)
    log = (work / "server.log").read_text()
    assert codes == [0, 0, 0], log[-2000:]
    return json.loads((work / "report.json").read_text())


def test_reft_with_logits_uplink_over_mosquitto(tmp_path, job_files, mosquitto):
    r = _run(tmp_path, job_files, mosquitto, ["--strategy", "reft", "--reft-uplink", "logits"])
    assert [x["devices_reporting"] for x in r["rounds"]] == [2, 2] and not r["rejected"]
    public = 400  # server.npz's public split: 400 samples x 10 classes of float32 logits
    for x in r["rounds"]:
        assert 2 * public * 10 * 4 <= x["uplink_bytes"] < 2 * (public * 10 * 4 + 1024)


def test_heterofl_over_mosquitto_each_device_trains_its_width(tmp_path, job_files, mosquitto):
    r = _run(tmp_path, job_files, mosquitto, ["--strategy", "heterofl",
                                           "--budgets", "rpi3b=0.25,jetson-orin-nano=1"])
    assert [x["devices_reporting"] for x in r["rounds"]] == [2, 2] and not r["rejected"]
    assert r["final_accuracy"] > 0.15


def test_bad_strategy_options_are_one_line(tmp_path):
    code, _, err = run_fedge("simulate", "--strategy", "heterofl", "--budgets", "rpi4=2",
                             "--json", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, 2, "--budgets: expected profile=width", "'rpi4=2'")
    code, _, err = run_fedge("simulate", "--strategy", "reft", "--reft-uplink", "logits",
                             "--codec", "sign", "--json", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, 2, "--reft-uplink logits: expected --codec fp32")
    code, _, err = run_fedge("simulate", "--train-profiles", "toaster",
                             "--json", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, 2, "unknown device profile 'toaster'")
    assert not (tmp_path / "x.json").exists()


def test_splitmix_over_mosquitto_from_a_plain_checkpoint(tmp_path, job_files, mosquitto):
    """`fedge serve --strategy splitmix` turns the checkpoint's architecture into bases;
    the weak device trains one base, the strong one all of them."""
    r = _run(tmp_path, job_files, mosquitto, ["--strategy", "splitmix",
                                              "--budgets", "rpi3b=0.125,jetson-orin-nano=1"])
    assert [x["devices_reporting"] for x in r["rounds"]] == [2, 2] and not r["rejected"]
    log = (tmp_path / "run" / "server.log").read_text()
    assert "training a fresh splitmix model" in log
