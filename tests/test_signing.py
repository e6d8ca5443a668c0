"""Signed manifests: the export signs, a device verifies the signature and every
artifact before it loads anything, and a device that refuses says so to the aggregator."""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import queue
import shutil
import threading

import numpy as np
import pytest

from device_runtime import messages
from device_runtime.errors import ManifestError, SignatureError
from device_runtime.keys import key_id, load_public_key
from device_runtime.manifest import load_manifest, sha256_file
from device_runtime.predictor import Predictor
from device_runtime.signing import verify_manifest
from device_runtime.transport.mqtt import MqttTransport
from testkit.field import wait_for
from testkit.timing import scaled
from tests.conftest import EXPORT_JOB, assert_one_line_error, run_fedge
from toolkit.cli.main import main
from toolkit.deploy.signing import ensure_key, public_key_path

DEVICE = "rpi4"


@pytest.fixture(scope="module")
def query(tmp_path_factory, mnist1d):
    path = tmp_path_factory.mktemp("query") / "x.npy"
    np.save(path, mnist1d.x_test[:50])
    return path


def _copy(fleet_export, tmp_path):
    shutil.copytree(fleet_export.parent, tmp_path / "fleet")
    return tmp_path / "fleet" / "manifest.json"


def _flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_the_device_digest_is_hashlibs_sha256(tmp_path):
    from device_runtime.digest import sha256_hex

    data = bytes(range(256)) * 8200  # more than one 1 MiB block
    (tmp_path / "blob").write_bytes(data)
    for chunk in (b"", b"abc", data):
        assert sha256_hex(chunk) == hashlib.sha256(chunk).hexdigest()
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


@pytest.mark.slow
def test_export_creates_the_default_key_and_a_signature_that_verifies(
        trained_ckpt, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    monkeypatch.setenv("FEDGE_HOME", str(home))
    out = tmp_path / "out"
    code = main(["export", "--checkpoint", str(trained_ckpt), "--profiles", DEVICE,
                 "--finetune-epochs", "0", "--no-int8", "--out", str(out)])
    stdout = capsys.readouterr().out
    assert code == 0
    key, pub = home / "signing.key", home / "signing.pub"
    assert f"created signing key {key}; devices trust its public key {pub}" in stdout
    assert key.stat().st_mode & 0o777 == 0o600
    sig = json.loads((out / "manifest.json.sig").read_text())
    assert sig["format"] == "fedge-signature/1" and sig["alg"] == "ed25519"
    assert sig["key_id"] == key_id(load_public_key(pub))
    assert len(base64.b64decode(sig["signature"], validate=True)) == 64
    assert verify_manifest(out / "manifest.json", pub) == sig["key_id"]
    assert f"signed by key {sig['key_id']}" in stdout
    # The next export (or any later call) reuses the key instead of making a new one.
    again = ensure_key()
    assert not again.created and again.key_id == sig["key_id"]


def test_key_files_and_bad_signing_keys(trained_ckpt, tmp_path, capsys):
    assert public_key_path(tmp_path / "signing.key") == tmp_path / "signing.pub"
    assert public_key_path(tmp_path / "ci.pem") == tmp_path / "ci.pem.pub"
    made = ensure_key(tmp_path / "keys" / "ci.pem")
    assert made.created and (tmp_path / "keys" / "ci.pem.pub").is_file()
    bad = tmp_path / "not-a-key.key"
    bad.write_text("hello")
    out = tmp_path / "out"
    code = main(["export", "--checkpoint", str(trained_ckpt), "--profiles", DEVICE,
                 "--signing-key", str(bad), "--out", str(out)])
    assert_one_line_error(code, capsys.readouterr().err, 2, f"signing key {bad}",
                          "Ed25519 private key")
    assert not out.exists() and not (tmp_path / "not-a-key.pub").exists()


def test_infer_with_trust_runs_an_untouched_export(fleet_export, export_key, query):
    code, out, err = run_fedge("infer", "--manifest", str(fleet_export), "--device", DEVICE,
                               "--input", str(query), "--trust", str(export_key.public_path))
    assert code == 0, err
    assert f"manifest signature verified (key {export_key.key_id})" in out
    assert "50 samples on rpi4 (rpi4/full.fp32.onnx, CPUExecutionProvider)" in out


def test_infer_without_trust_is_refused_unless_told_no_verify(fleet_export, export_key, query,
                                                              tmp_path):
    """A manifest whose hashes were rewritten (another model, sha256 updated) is never
    used silently: without --trust, infer refuses to run unless told --no-verify."""
    manifest = _copy(fleet_export, tmp_path)
    _swap_model(manifest)
    labels = tmp_path / "labels.npy"
    base = ["infer", "--manifest", str(manifest), "--device", DEVICE, "--input", str(query)]
    code, _, err = run_fedge(*base, "--output", str(labels))
    assert_one_line_error(code, err, 2, "fedge infer: error: --trust PUBKEY is required",
                          "--no-verify")
    assert not labels.exists()
    code, _, err = run_fedge(*base, "--trust", str(export_key.public_path), "--no-verify")
    assert_one_line_error(code, err, 2, "not allowed with argument")
    code, out, err = run_fedge(*base, "--no-verify")
    assert code == 0, err
    assert "manifest NOT verified (--no-verify)" in out


def _swap_model(manifest):
    """An attacker's edit: another model's bytes, and the manifest's sha256 updated to
    match, so the sha256 check alone passes."""
    root = manifest.parent
    target = root / DEVICE / "full.fp32.onnx"
    shutil.copyfile(root / "rpi3b" / "full.fp32.onnx", target)
    doc = json.loads(manifest.read_text())
    for a in doc["devices"][DEVICE]["artifacts"]:
        if a["path"] == f"{DEVICE}/full.fp32.onnx":
            a["sha256"] = sha256_file(target)
    manifest.write_text(json.dumps(doc, indent=1))


def _garbage_signature(manifest):
    (manifest.parent / "manifest.json.sig").write_text("{")


# case -> (what is done to the copy, what the one-line error must say)
TAMPERING = {
    "artifact byte": (lambda m: _flip_byte(m.parent / DEVICE / "full.fp32.onnx"),
                      ["artifact rpi4/full.fp32.onnx fails its sha256 check"]),
    "manifest json": (_swap_model, ["manifest.json does not match its signature "
                                    "manifest.json.sig", "modified after signing"]),
    "signature removed": (lambda m: (m.parent / "manifest.json.sig").unlink(),
                          ["manifest.json.sig is missing", "is not signed"]),
    "signature garbage": (_garbage_signature,
                          ["manifest.json.sig is malformed: not a JSON document"]),
    "another key": (None, ["manifest.json is signed by key", "not by the trusted key"]),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_infer_with_trust_refuses_tampering(case, fleet_export, export_key, query, tmp_path,
                                            capsys):
    manifest = _copy(fleet_export, tmp_path)
    tamper, needles = TAMPERING[case]
    trust = export_key.public_path
    if tamper is None:  # an untouched export, checked against a key that did not sign it
        trust = ensure_key(tmp_path / "other.key").public_path
    else:
        tamper(manifest)
    labels = tmp_path / "labels.npy"
    code = main(["infer", "--manifest", str(manifest), "--device", DEVICE, "--input",
                 str(query), "--output", str(labels), "--trust", str(trust)])
    assert_one_line_error(code, capsys.readouterr().err, 6, *needles)
    assert not labels.exists()
    if case == "manifest json":  # without the signature the swapped model would run
        assert main(["infer", "--manifest", str(manifest), "--device", DEVICE,
                     "--input", str(query), "--no-verify"]) == 0


def test_signature_is_checked_before_the_manifest_is_parsed(fleet_export, export_key,
                                                            tmp_path, monkeypatch):
    manifest = _copy(fleet_export, tmp_path)
    manifest.write_text('{"format": "fedge-manifest/1", "devices": [')
    with pytest.raises(ManifestError, match="not readable JSON"):
        load_manifest(manifest)
    with pytest.raises(SignatureError, match="modified after signing"):
        load_manifest(manifest, trust=export_key.public_path)
    _swap_model(_copy(fleet_export, tmp_path / "b"))
    opened = []
    monkeypatch.setattr("device_runtime.predictor.open_session",
                        lambda *a, **k: opened.append(a))
    with pytest.raises(SignatureError):
        Predictor.from_manifest(tmp_path / "b" / "fleet", DEVICE,
                                trust=export_key.public_path)
    assert opened == []


def test_device_with_a_manifest_but_no_trusted_key_is_a_usage_error(fleet_export, tmp_path,
                                                                     capsys):
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=np.zeros((4, 40), np.float32), y=np.zeros(4, np.int64))
    # Port 1: had it tried to connect, the error would be another one.
    code = main(["device", "--broker", "mqtt://127.0.0.1:1", "--job", "j", "--id", "d",
                 "--profile", DEVICE, "--data", str(shard), "--manifest", str(fleet_export)])
    assert_one_line_error(code, capsys.readouterr().err, 2, "--manifest needs --trust")


def _agents(url, job, n, manifest, trust):
    from device_runtime.agent import AgentOptions, DeviceAgent
    from device_runtime.keys import PublicKey
    from device_runtime.topics import Topics
    from device_runtime.transport.mqtt import MqttTransport
    from tests.keys import KEYS, will

    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        t = MqttTransport(url, f"good-{k}", will=will(Topics(job), f"good-{k}"))
        t.connect()
        agent = DeviceAgent(t, AgentOptions(job, f"good-{k}", DEVICE, manifest=str(manifest),
                                            trust=str(trust), key=KEYS.device(f"good-{k}"),
                                            server_key=PublicKey.load(trust)),
                            rng.normal(size=(64, 40)).astype(np.float32),
                            rng.integers(0, 10, 64))
        thread = threading.Thread(target=agent.run, daemon=True)
        thread.start()
        out.append((t, thread))
    return out


def test_device_refuses_a_tampered_export_and_the_aggregator_reports_it(
        fleet_export, export_key, mosquitto, tmp_path, caplog):
    from broker_server.service import Aggregator, ServeOptions
    from broker_server.trust import ServerTrust
    from device_runtime.keys import Signer
    from device_runtime.training.local import weights_of
    from device_runtime.training.models import ModelConfig, build_model
    from device_runtime.transport.mqtt import MqttTransport
    from tests.keys import KEYS

    job = EXPORT_JOB  # the export is made for it
    device_key = KEYS.device("bad").save(tmp_path / "bad.key")
    bad = _copy(fleet_export, tmp_path)
    _flip_byte(bad.parent / DEVICE / "full.int8.onnx")  # not the model it opens: all checked
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=np.zeros((8, 40), np.float32), y=np.zeros(8, np.int64))
    code, _, err = run_fedge("device", "--broker", mosquitto.url, "--job", job, "--id", "bad",
                             "--profile", DEVICE, "--data", str(shard), "--manifest", str(bad),
                             "--trust", str(export_key.public_path),
                             "--idle-timeout", f"{scaled(30):g}", "--key", str(device_key))
    refusal = "refused: artifact rpi4/full.int8.onnx fails its sha256 check"
    assert_one_line_error(code, err, 6, refusal)

    watch = MqttTransport(mosquitto.url, "watcher")
    watch.connect()
    seen: queue.Queue = queue.Queue()
    watch.subscribe(f"fedge/{job}/devices/bad/status", lambda t, p: seen.put(p))
    sent = seen.get(timeout=scaled(10))  # retained: still there
    status = messages.unseal(messages.Status, sent, KEYS.get("bad"), job).msg
    assert status.state == "error" and status.error.startswith(refusal)

    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25)
    agg_t = MqttTransport(mosquitto.url, "agg", persistent=True)
    agg_t.connect()
    agg = Aggregator(agg_t, ServeOptions(job, tmp_path / "state", rounds=1, min_devices=2,
                                         round_timeout=scaled(30.0), epochs=1),
                     cfg.to_json(), weights_of(build_model(cfg)),  # one operator key
                     trust=ServerTrust(job, Signer.load(export_key.path), KEYS))
    result: dict = {}
    caplog.set_level(logging.WARNING, logger="fedge.server")
    server = threading.Thread(target=lambda: result.update(agg.run()), daemon=True)
    server.start()
    wait_for(lambda: "bad" in agg.devices, 30, "the aggregator to see the refusal")
    # The same status again (as after a reconnect): it must not warn twice.
    watch.publish(f"fedge/{job}/devices/bad/status", sent, retain=True)
    good = _agents(mosquitto.url, job, 2, fleet_export, export_key.public_path)
    server.join(timeout=scaled(120))
    assert not server.is_alive()
    for t, thread in good:
        thread.join(timeout=scaled(30))
        t.close()
    watch.close()
    agg_t.close()
    assert result["device_errors"] == {"bad": status.error}
    assert result["rounds"][0]["accepted"] == ["good-0", "good-1"]
    assert result["rounds"][0]["devices_assigned"] == 2  # "bad" got no task
    warned = [r for r in caplog.records if "device bad is in error" in r.getMessage()]
    assert len(warned) == 1  # once per distinct error, though it was published twice
    versions = agg.devices["good-0"].versions
    assert versions["ort_provider"] == "CPUExecutionProvider"
    assert versions["manifest_key"] == export_key.key_id
    assert versions["artifacts_verified"] == len(
        load_manifest(fleet_export).device(DEVICE).artifacts)


def test_device_refuses_a_manifest_edited_after_signing(fleet_export, export_key, mosquitto,
                                                        tmp_path):
    """The edit keeps the manifest valid JSON and consistent with the files (a swapped
    artifact with its new sha256): only the signature can tell, and the device's
    retained status says so."""
    from tests.keys import KEYS

    bad = _copy(fleet_export, tmp_path)
    data = json.loads(bad.read_text())
    art = data["devices"][DEVICE]["artifacts"][0]
    _flip_byte(bad.parent / art["path"])
    art["sha256"] = hashlib.sha256((bad.parent / art["path"]).read_bytes()).hexdigest()
    bad.write_text(json.dumps(data, indent=2))
    shard = tmp_path / "shard.npz"
    np.savez(shard, x=np.zeros((8, 40), np.float32), y=np.zeros(8, np.int64))
    key = KEYS.device("pi-9").save(tmp_path / "pi-9.key")
    code, _, err = run_fedge("device", "--broker", mosquitto.url, "--job", "edited", "--id",
                             "pi-9", "--profile", DEVICE, "--data", str(shard), "--manifest",
                             str(bad), "--trust", str(export_key.public_path), "--key", str(key))
    assert_one_line_error(code, err, 6, "refused: manifest", "does not match its signature")
    watch = MqttTransport(mosquitto.url, "watcher-edited")
    watch.connect()
    seen: queue.Queue = queue.Queue()
    watch.subscribe("fedge/edited/devices/pi-9/status", lambda t, p: seen.put(p))
    status = messages.unseal(messages.Status, seen.get(timeout=scaled(10)), KEYS.get("pi-9"),
                             "edited").msg
    watch.close()
    assert status.state == "error" and "does not match its signature" in status.error
