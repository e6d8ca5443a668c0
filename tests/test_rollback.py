"""Versioned, job-bound exports: the signed manifest carries a version and a job, a
device refuses another job's export and an older version than it accepted (a
rollback), and only an operator's --allow-rollback takes one back."""
from __future__ import annotations

import json
import queue
import shutil
from pathlib import Path

import numpy as np
import pytest

from device_runtime import messages
from device_runtime.manifest import load_manifest
from device_runtime.rollback import LEDGER_NAME
from testkit.timing import scaled
from tests.conftest import EXPORT_JOB, assert_one_line_error, run_fedge
from tests.keys import KEYS
from toolkit.cli.main import main
from toolkit.deploy.signing import sign_manifest

DEVICE = "rpi4"
_DROP = object()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A device's own FEDGE_HOME (its ledger starts empty); the signing key stays the
    session's, since the key is given explicitly below."""
    path = tmp_path / "device-home"
    monkeypatch.setenv("FEDGE_HOME", str(path))
    return path


def _reissue(fleet_export: Path, dest: Path, key, **fields) -> Path:
    """A validly signed copy of the export with ``fields`` of the manifest changed (as a
    later `fedge export --version N --job J` of the same model would write them)."""
    shutil.copytree(fleet_export.parent, dest)
    manifest = dest / "manifest.json"
    doc = json.loads(manifest.read_text())
    for name, value in fields.items():
        if value is _DROP:
            doc.pop(name, None)
        else:
            doc[name] = value
    manifest.write_text(json.dumps(doc, indent=1))
    sign_manifest(manifest, key)
    return manifest


def _check(manifest: Path, trust: Path, tmp_path: Path, *extra: str, job=EXPORT_JOB):
    """`fedge device --check` in this process: (exit code, stdout, stderr)."""
    key = tmp_path / "pi-1.key"  # the device's own signing key
    if not key.exists():
        KEYS.device("pi-1").save(key)
    return main(["device", "--broker", "mqtt://broker:1883", "--job", job, "--id", "pi-1",
                 "--profile", DEVICE, "--data", str(tmp_path / "none.npz"), "--manifest",
                 str(manifest), "--trust", str(trust), "--key", str(key), "--check", *extra])


def _ledger(home: Path) -> dict:
    return json.loads((home / LEDGER_NAME).read_text())["jobs"]


@pytest.mark.slow
def test_export_writes_a_version_that_goes_up_and_the_job(trained_ckpt, export_key, tmp_path,
                                                          capsys):
    out = tmp_path / "out"
    args = ["export", "--checkpoint", str(trained_ckpt), "--profiles", DEVICE,
            "--finetune-epochs", "0", "--no-int8", "--out", str(out),
            "--signing-key", str(export_key.path)]
    assert main([*args, "--job", "field-7"]) == 0
    assert "(version 1, job field-7)" in capsys.readouterr().out
    m = load_manifest(out, trust=export_key.public_path)
    assert (m.version, m.job) == (1, "field-7")
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["format"] == "fedge-manifest/2" and raw["version"] == 1  # in the signed bytes
    assert main([*args, "--job", "field-7"]) == 0  # the same folder again: the next version
    assert load_manifest(out, trust=export_key.public_path).version == 2
    before = (out / "manifest.json").read_bytes()
    code = main([*args, "--version", "2"])
    assert_one_line_error(code, capsys.readouterr().err, 2, "--version 2: expected more "
                          "than 2")
    assert (out / "manifest.json").read_bytes() == before  # nothing changed
    assert main([*args, "--version", "10"]) == 0  # no --job: bound to none
    m = load_manifest(out, trust=export_key.public_path)
    assert (m.version, m.job) == (10, None)


def test_an_older_signed_export_passes_check_no_more(fleet_export, export_key, home, tmp_path,
                                                     capsys):
    pub = export_key.public_path
    old = _reissue(fleet_export, tmp_path / "v1", export_key, version=1)
    new = _reissue(fleet_export, tmp_path / "v2", export_key, version=2)
    assert _check(new, pub, tmp_path) == 0
    assert "export version 2 for job j1" in capsys.readouterr().out
    ledger = home / LEDGER_NAME
    assert ledger.stat().st_mode & 0o777 == 0o600
    assert _ledger(home)[EXPORT_JOB]["version"] == 2
    # The attack: the older export, validly signed by the same key, put back in place.
    assert _check(old, pub, tmp_path) == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, "fedge device: error:",
                          "is version 1, older than version 2 this device accepted",
                          "--allow-rollback")
    assert _ledger(home)[EXPORT_JOB]["version"] == 2  # the refusal changed nothing
    # The operator's word: accepted, and the lower version is now the one recorded.
    assert _check(old, pub, tmp_path, "--allow-rollback") == 0
    assert "export version 1, was 2" in capsys.readouterr().out
    assert _ledger(home)[EXPORT_JOB]["version"] == 1
    assert _check(old, pub, tmp_path) == 0  # the same version again (a restart): fine
    assert _check(new, pub, tmp_path) == 0 and _ledger(home)[EXPORT_JOB]["version"] == 2


def test_another_jobs_export_or_one_bound_to_no_job_is_refused(fleet_export, export_key, home,
                                                               tmp_path, capsys):
    pub = export_key.public_path
    assert _check(fleet_export, pub, tmp_path, job="other") == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, "was made for job 'j1'; this "
                          "device runs job 'other'")
    unbound = _reissue(fleet_export, tmp_path / "unbound", export_key, job=None)
    assert _check(unbound, pub, tmp_path) == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, "made for no job (exported without "
                          "--job); this device runs job 'j1'")
    assert not (home / LEDGER_NAME).exists()  # nothing refused was recorded
    # A bundle for another job is refused when it is made, not when it is installed.
    code, _, err = run_fedge("bundle", "--manifest", str(fleet_export), "--device", DEVICE,
                             "--broker", "mqtt://broker:1883", "--job", "other", "--id", "pi-1",
                             "--out", str(tmp_path / "b.tar.gz"),
                             "--trust", str(pub), "--signing-key", str(export_key.path))
    assert_one_line_error(code, err, 6, "was made for job 'j1'")
    assert not (tmp_path / "b.tar.gz").exists()


def test_an_unversioned_manifest_is_refused_given_a_trusted_key(fleet_export, export_key, home,
                                                                tmp_path, capsys, mnist1d):
    v1 = _reissue(fleet_export, tmp_path / "v1", export_key, format="fedge-manifest/1",
                  version=_DROP, job=_DROP)
    assert _check(v1, export_key.public_path, tmp_path) == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, "is fedge-manifest/1, which has no "
                          "version and no job", "refuses an unversioned export")
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test[:5])
    assert main(["infer", "--manifest", str(v1), "--device", DEVICE, "--input", str(x),
                 "--no-verify"]) == 0  # still readable, when the operator says so


def test_infer_refuses_a_rollback_and_another_job(fleet_export, export_key, home, tmp_path,
                                                  capsys, mnist1d):
    x = tmp_path / "x.npy"
    np.save(x, mnist1d.x_test[:5])
    pub = str(export_key.public_path)
    old = _reissue(fleet_export, tmp_path / "v3", export_key, version=3)
    new = _reissue(fleet_export, tmp_path / "v4", export_key, version=4)

    def infer(manifest, *extra):
        return main(["infer", "--manifest", str(manifest), "--device", DEVICE, "--input",
                     str(x), "--trust", pub, *extra])
    assert infer(new) == 0
    assert "export version 4 for job j1" in capsys.readouterr().out
    assert infer(old) == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, "fedge infer: error:",
                          "is version 3, older than version 4")
    assert infer(old, "--allow-rollback") == 0 and _ledger(home)[EXPORT_JOB]["version"] == 3
    capsys.readouterr()
    assert infer(new, "--job", "other") == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, "this device runs job 'other'")


@pytest.mark.parametrize("text, needle", [
    ("{", "not a JSON document"),
    ('{"format": "fedge-accepted/1", "jobs": {"j1": {"version": "9"}}}',
     "jobs.j1.version: expected an int >= 1, got '9'"),
])
def test_a_damaged_ledger_is_a_refusal_naming_it(fleet_export, export_key, home, tmp_path,
                                                 capsys, text, needle):
    home.mkdir()
    (home / LEDGER_NAME).write_text(text)
    assert _check(fleet_export, export_key.public_path, tmp_path) == 6
    assert_one_line_error(6, capsys.readouterr().err, 6, f"export ledger {home / LEDGER_NAME} "
                          "is damaged", needle)
    assert (home / LEDGER_NAME).read_text() == text


def test_a_running_device_refuses_an_older_export_and_says_so(fleet_export, export_key,
                                                              mosquitto, tmp_path):
    """`fedge device` (not --check) on a rolled-back export: exit 6, and the refusal is
    its retained status, so the aggregator assigns it nothing."""
    home = tmp_path / "home"
    new = _reissue(fleet_export, tmp_path / "v2", export_key, version=2)
    old = _reissue(fleet_export, tmp_path / "v1", export_key, version=1)
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=np.zeros((8, 40), np.float32), y=np.zeros(8, np.int64))
    key = KEYS.device("pi-3").save(tmp_path / "pi-3.key")
    base = ["device", "--broker", mosquitto.url, "--job", EXPORT_JOB, "--id", "pi-3",
            "--profile", DEVICE, "--data", str(shard), "--trust", str(export_key.public_path),
            "--key", str(key)]
    code, out, err = run_fedge(*base, "--manifest", str(new), "--check",
                               env={"FEDGE_HOME": str(home)})
    assert code == 0, err
    code, _, err = run_fedge(*base, "--manifest", str(old), "--idle-timeout", "5",
                             env={"FEDGE_HOME": str(home)})
    refusal = "refused: manifest"
    assert_one_line_error(code, err, 6, refusal, "is version 1, older than version 2")
    from device_runtime.transport.mqtt import MqttTransport

    watch = MqttTransport(mosquitto.url, "watcher-rollback")
    watch.connect()
    seen: queue.Queue = queue.Queue()
    watch.subscribe(f"fedge/{EXPORT_JOB}/devices/pi-3/status", lambda t, p: seen.put(p))
    status = messages.unseal(messages.Status, seen.get(timeout=scaled(10)), KEYS.get("pi-3"),
                             EXPORT_JOB).msg
    watch.close()
    assert status.state == "error" and "older than version 2" in status.error
