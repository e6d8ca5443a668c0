"""`fedge bundle` -> `install.sh` -> the agent as a service: installed offline from a
local wheelhouse into a fresh venv without torch, it joins a job on a real broker."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.brokers import Mosquitto
from tests.conftest import EXPORT_JOB, ROOT, assert_one_line_error, run_fedge
from tests.field_helpers import finish, prepare_job, start_server

WHEELHOUSE = Path(os.environ.get("FEDGE_WHEELHOUSE") or ROOT / ".wheelhouse")


def _wheelhouse() -> Path:
    if not any(WHEELHOUSE.glob("onnxruntime-*.whl")):
        pytest.fail(f"no wheelhouse at {WHEELHOUSE}: run `fedge wheelhouse --out .wheelhouse` "
                    "once (README's test command does)")
    return WHEELHOUSE


def _device_env() -> dict:
    """What a device has: no checkout on the path, no pip config pointing at local
    indexes or a torch wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    return dict(env, PIP_CONFIG_FILE=os.devnull, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")


def _bundle(tmp_path: Path, manifest: Path, url: str, job: str, *extra: str) -> Path:
    out = tmp_path / "pi-1.tar.gz"
    code, stdout, err = run_fedge("bundle", "--manifest", str(manifest), "--device", "rpi4",
                                  "--broker", url, "--job", job, "--id", "pi-1",
                                  "--out", str(out), *extra)
    assert code == 0, err
    assert "wrote" in stdout
    return out


def _unpack(bundle: Path, dest: Path) -> Path:
    with tarfile.open(bundle) as tf:
        tf.extractall(dest, filter="data")
    return dest / "fedge-pi-1"


@pytest.fixture
def secure_broker(tmp_path):
    """`fedge secure init` for pi-1 and a real Mosquitto running its TLS config: (DIR,
    the devices' URL, the aggregator's URL)."""
    from broker_server.embedded import free_port

    port, agg_port = free_port(), free_port()
    code, _, err = run_fedge("secure", "init", "--devices", "pi-1", "--out",
                             str(tmp_path / "sec"), "--port", str(port), "--aggregator-port",
                             str(agg_port))
    assert code == 0, err
    m = Mosquitto(tmp_path / "mosq", port=port, config=tmp_path / "sec" / "mosquitto.conf")
    m.start()
    yield tmp_path / "sec", f"mqtts://localhost:{port}", f"mqtts://localhost:{agg_port}"
    m.stop()


def test_bundle_installs_offline_without_torch_and_joins_a_job_over_tls(tmp_path,
                                                                        secure_broker,
                                                                        fleet_export):
    wheels = _wheelhouse()
    sec, url, agg_url = secure_broker
    work = tmp_path / "run"
    work.mkdir()
    ckpt = prepare_job(work, devices=1)
    job = EXPORT_JOB  # the job the export is made for: the device refuses another
    bundle = _bundle(tmp_path, fleet_export, url, job, "--strategy", "ecofed",
                     "--data", str(work / "data" / "device-0.npz"),
                     "--credentials", str(sec / "credentials" / "pi-1.json"))
    unpacked = _unpack(bundle, tmp_path / "unpacked")
    shipped = sorted(p.relative_to(unpacked / "artifacts").as_posix()
                     for p in (unpacked / "artifacts").rglob("*.onnx"))
    assert shipped and all(s.startswith("rpi4/") for s in shipped)  # its artifacts only
    assert (unpacked / "certs" / "pi-1.key").stat().st_mode & 0o777 == 0o600
    # the device's signing key and the aggregator's public key travel with it
    assert (unpacked / "certs" / "pi-1.signing.key").stat().st_mode & 0o777 == 0o600
    assert (unpacked / "server.pub").read_bytes() == (sec / "server.pub").read_bytes()

    prefix = tmp_path / "opt" / "fedge"
    p = subprocess.run(["sh", str(unpacked / "install.sh"), "--prefix", str(prefix),
                        "--wheelhouse", str(wheels), "--no-systemd"], env=_device_env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    py = prefix / "venv" / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import toolkit, importlib.util as u; "
                            "print(toolkit.__file__); print(u.find_spec('torch'))"],
                           env=_device_env(), cwd=tmp_path, capture_output=True, text=True)
    where, torch_spec = probe.stdout.split()[:2]
    assert where.startswith(str(prefix)) and torch_spec == "None", probe.stdout + probe.stderr
    unit = prefix / "etc" / "fedge-device.service"
    assert f"ExecStart={prefix}/venv/bin/fedge device --config {prefix}/etc/device.toml" \
        in unit.read_text()
    if shutil.which("systemd-analyze"):
        v = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                           text=True, timeout=60)
        assert v.returncode == 0, v.stderr

    server = start_server(agg_url, job, work, ckpt, rounds=1, min_devices=1, round_timeout=60,
                          extra=["--strategy", "ecofed", "--codec", "act4", "--profiles", "rpi4",
                                 "--credentials", str(sec / "credentials" / "aggregator.json")])
    device = subprocess.Popen([str(prefix / "venv" / "bin" / "fedge"), "device", "--config",
                               str(prefix / "etc" / "device.toml"), "--idle-timeout", "120"],
                              env=_device_env(), cwd=prefix / "var",
                              stdout=open(work / "device.log", "wb"), stderr=subprocess.STDOUT)
    codes = finish([server], timeout=240) + finish([device], timeout=60)
    log = (work / "device.log").read_text()
    assert codes == [0, 0], (work / "server.log").read_text()[-1500:] + log[-1500:]
    report = json.loads((work / "report.json").read_text())
    assert [r["devices_reporting"] for r in report["rounds"]] == [1]
    assert "pi-1: trained 1 rounds" in log
    assert report["broker"] == agg_url and not report.get("device_errors")


def test_a_modified_bundle_installs_nothing(tmp_path, fleet_export):
    bundle = _bundle(tmp_path, fleet_export, "mqtt://broker:1883", EXPORT_JOB)
    unpacked = _unpack(bundle, tmp_path / "unpacked")
    config = unpacked / "device.toml"
    config.write_text(config.read_text().replace("mqtt://broker:1883", "mqtt://evil:1883"))
    prefix = tmp_path / "opt"
    p = subprocess.run(["sh", str(unpacked / "install.sh"), "--prefix", str(prefix),
                        "--no-systemd"], env=_device_env(), capture_output=True, text=True,
                       timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1].startswith("install.sh: error: bundle files do "
                                                         "not match SHA256SUMS")
    assert not prefix.exists()


def test_the_same_export_gives_the_same_bundle_bytes(tmp_path, fleet_export):
    a = _bundle(tmp_path, fleet_export, "mqtt://broker:1883", EXPORT_JOB)
    first = a.read_bytes()
    b = _bundle(tmp_path, fleet_export, "mqtt://broker:1883", EXPORT_JOB)
    assert b.read_bytes() == first


@pytest.mark.parametrize("change, needle", [
    (("--device", "no-such-board"), "no device 'no-such-board'"),
    (("--broker", "http://broker"), "scheme must be mqtt or mqtts"),
    (("--strategy", "fedsgd"), "unknown strategy 'fedsgd'"),
    (("--id", "bad id"), "device id"),
    (("--trust", "/no/such.pub"), "--trust /no/such.pub"),
])
def test_bad_bundle_inputs_are_one_line_and_write_nothing(tmp_path, fleet_export, change,
                                                          needle):
    args = {"--manifest": str(fleet_export), "--device": "rpi4",
            "--broker": "mqtt://broker:1883", "--job": EXPORT_JOB, "--id": "pi-1",
            "--out": str(tmp_path / "b.tar.gz")}
    args[change[0]] = change[1]
    code, _, err = run_fedge("bundle", *[x for kv in args.items() for x in kv])
    assert_one_line_error(code, err, 2, needle)
    assert list(tmp_path.iterdir()) == []


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "etc" / "device.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_device_config_relative_paths_and_command_line_wins(tmp_path, fleet_export,
                                                            export_key):
    """What a bundle's device.toml gives: paths relative to the file, options from the
    command line over the file's, and --check verifying the signed export."""
    import numpy as np

    shutil.copytree(fleet_export.parent, tmp_path / "etc" / "artifacts")
    shutil.copy(export_key.public_path, tmp_path / "etc" / "trust.pub")
    np.savez(tmp_path / "local.npz", x=np.zeros((7, 40), np.float32), y=np.zeros(7, np.int64))
    cfg = _config(tmp_path, 'broker = "mqtt://broker:1883"\njob = "j1"\nid = "pi-1"\n'
                  'profile = "rpi4"\ndata = "../local.npz"\nmanifest = '
                  '"artifacts/manifest.json"\ntrust = "trust.pub"\n')
    code, out, err = run_fedge("device", "--config", str(cfg), "--check", cwd=ROOT.parent)
    assert code == 0, err
    assert out.startswith("device pi-1: ok (rpi4, broker mqtt://broker:1883")
    assert f"(key {export_key.key_id})" in out and "7 samples" in out
    code, out, _ = run_fedge("device", "--config", str(cfg), "--id", "pi-2",
                             "--data", str(tmp_path / "none.npz"), "--check")
    assert code == 0 and out.startswith("device pi-2: ok") and "no data yet at" in out
    (tmp_path / "etc" / "artifacts" / "manifest.json.sig").unlink()  # an unsigned export
    code, _, err = run_fedge("device", "--config", str(cfg), "--check")
    assert_one_line_error(code, err, 6, "manifest.json.sig is missing")


@pytest.mark.parametrize("text, needle", [
    ('brokr = "mqtt://b:1883"\n', "unknown key 'brokr'; valid keys: broker, job"),
    ('broker = "mqtt://b:1883"\nthreads = "two"\n', "threads: expected int, got 'two'"),
    ('broker = "mqtt://b:1883\n', "is not TOML"),
    ('broker = "mqtt://b:1883"\n', "missing --job, --id, --profile, --data"),
])
def test_bad_device_configs_are_one_line(tmp_path, text, needle):
    code, _, err = run_fedge("device", "--config", str(_config(tmp_path, text)))
    assert_one_line_error(code, err, 2, needle)
