"""fedge secure add / revoke on a running Mosquitto (a SIGHUP makes it re-read the ACL
and the CRL), their refusals, --keys-only and --signing-key."""
from __future__ import annotations

import json
import shutil
import signal
import stat

import paho.mqtt.client as paho
import pytest
from cryptography import x509

from device_runtime.credentials import Credentials, transport_kwargs
from device_runtime.keys import PublicKey, Registry, Signer
from device_runtime.topics import Topics
from device_runtime.transport.mqtt import MqttTransport
from testkit.brokers import mosquitto_binary
from testkit.timing import scaled
from tests.conftest import assert_one_line_error, run_fedge
from tests.secure_helpers import JOB, Raw, start_fleet, wait_for

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")


def _snapshot(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _reaches_aggregator(f, device: str, payload: bytes) -> bool:
    """Whether ``device``'s update (MQTT 5: PUBACK says if the ACL let it through)
    reaches the aggregator."""
    topics = Topics(JOB)
    agg = Raw(f, "aggregator")
    agg.subscribe(topics.update())
    dev = Raw(f, device, protocol=paho.MQTTv5)
    try:
        if dev.connack != "Success":
            return False
        if dev.publish(topics.update(1, device), payload) != "Success":
            return False
        wait_for(lambda: not agg.messages.empty(), f"{device}'s update")
        return agg.received() == [(topics.update(1, device), payload)]
    finally:
        dev.close()
        agg.close()


def test_add_and_revoke_on_a_running_broker(tmp_path):
    f = start_fleet(tmp_path)
    root, broker, _ = f
    try:
        # add: a certificate from the same CA, so it connects at once; its topics come
        # with the ACL, which Mosquitto re-reads on SIGHUP
        code, out, err = run_fedge("secure", "add", "dev-2", "--dir", str(root))
        assert code == 0, err
        assert "kill -HUP" in out
        creds = Credentials.load(root / "credentials" / "dev-2.json")
        assert creds.max_payload == 1 << 20  # as the aggregator's: the broker's limit
        registry = Registry.load(root / "registry.json")
        assert sorted(registry.devices) == ["dev-0", "dev-1", "dev-2"]
        assert registry.get("dev-2").raw() == Signer.load(creds.signing_key).public.raw()
        assert stat.S_IMODE(creds.signing_key.stat().st_mode) == 0o600
        assert not _reaches_aggregator(f, "dev-2", b"before the reload")
        broker.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: _reaches_aggregator(f, "dev-2", b"after"), "dev-2's ACL", timeout=10)
        # revoke: dev-1's key kept, as a thief would; dev-1 stays connected meanwhile
        stolen = tmp_path / "stolen"
        shutil.copytree(root, stolen)
        live = Raw(f, "dev-1", protocol=paho.MQTTv5)
        code, out, err = run_fedge("secure", "revoke", "dev-1", "--dir", str(root))
        assert code == 0, err
        assert sorted(Registry.load(root / "registry.json").devices) == ["dev-0", "dev-2"]
        assert not (root / "credentials" / "dev-1.json").exists()
        assert not (root / "certs" / "dev-1.key").exists()
        assert "user dev-1\n" not in (root / "broker" / "acl").read_text()
        cert = (root / "certs/dev-1.crt").read_bytes()
        serial = x509.load_pem_x509_certificate(cert).serial_number
        crl = x509.load_pem_x509_crl((root / "broker" / "crl.pem").read_bytes())
        assert crl.get_revoked_certificate_by_serial_number(serial) is not None
        broker.proc.send_signal(signal.SIGHUP)
        # the connected client loses its topics; a new connection fails the handshake
        wait_for(lambda: live.publish(Topics(JOB).update(1, "dev-1"), b"x") == "Not authorized",
              "the reloaded ACL", timeout=10)
        live.close()
        thief = Raw((stolen, broker, f[2]), "dev-1")
        assert thief.connack is None
        thief.close()
        assert _reaches_aggregator(f, "dev-0", b"dev-0 unaffected")
    finally:
        broker.stop()


def test_add_and_revoke_refuse_bad_ids_and_change_nothing(tmp_path):
    root = tmp_path / "sec"
    code, _, err = run_fedge("secure", "init", "--devices", "dev-0", "dev-1", "--out", str(root))
    assert code == 0, err
    before = _snapshot(root)
    for cmd, needle in ((["revoke", "dev-9"],
                         "ID 'dev-9': not in the fleet (%s); its devices: dev-0, dev-1"
                         % (root / "registry.json")),
                        (["add", "dev-0"], "ID 'dev-0': already in the fleet"),
                        (["add", "aggregator"], "ID: 'aggregator' is the aggregator's id"),
                        (["add", "a/b"], "ID: device id: expected 1-64")):
        code, _, err = run_fedge("secure", *cmd, "--dir", str(root))
        assert_one_line_error(code, err, 2, needle)
    code, _, err = run_fedge("secure", "add", "dev-2", "--dir", str(tmp_path))
    assert_one_line_error(code, err, 2, f"{tmp_path}: no registry.json")
    assert _snapshot(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sec"]
    assert not any(p.name.startswith(".") for p in root.rglob("*"))  # no temporary files


def test_keys_only_gives_keys_and_credentials_for_a_plain_broker(tmp_path, mosquitto):
    root = tmp_path / "keys"
    code, out, err = run_fedge("secure", "init", "--devices", "dev-0", "dev-1", "--out",
                               str(root), "--keys-only")
    assert code == 0, err
    assert "mosquitto -c" not in out and "--broker mqtt://HOST" in out
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    clients = ("aggregator", "dev-0", "dev-1")
    assert files == sorted(["server.pub", "registry.json"]
                           + [f"certs/{c}.signing.key" for c in clients]
                           + [f"credentials/{c}.json" for c in clients]
                           + ["credentials/dashboard.json"])
    dash = root / "credentials" / "dashboard.json"
    assert json.loads(dash.read_text()) == {"username": "dashboard", "trust": "server.pub",
                                            "registry": "registry.json"}
    # a fleet without it (written before init issued it) gets it once from secure add
    dash.unlink()
    code, out, err = run_fedge("secure", "add", "dashboard", "--dir", str(root))
    assert code == 0 and "read-only dashboard login" in out, err
    assert json.loads(dash.read_text())["registry"] == "registry.json"
    code, _, err = run_fedge("secure", "add", "dashboard", "--dir", str(root))
    assert_one_line_error(code, err, 2, "'dashboard': already issued")
    code, _, err = run_fedge("secure", "init", "--devices", "dashboard", "--out",
                             str(tmp_path / "other"), "--keys-only")
    assert_one_line_error(code, err, 2, "'dashboard' is the dashboard's id")
    dev = json.loads((root / "credentials" / "dev-0.json").read_text())
    assert dev == {"username": "dev-0", "signing_key": "certs/dev-0.signing.key",
                   "trust": "server.pub"}
    agg = Credentials.load(root / "credentials" / "aggregator.json")
    assert (agg.password, agg.cert, agg.registry) == (None, None, root / "registry.json")
    assert PublicKey.load(root / "server.pub").raw() == \
        Signer.load(agg.signing_key).public.raw()
    kw = transport_kwargs(root / "credentials" / "dev-0.json", "dev-0")
    assert kw == {"username": "dev-0", "password": None}
    t = MqttTransport(mosquitto.url, "fedge-k-dev-0", **kw)  # plain MQTT: no TLS files
    t.connect(timeout=scaled(5))
    t.close()
    # add and revoke work on a keys-only fleet too (the registry; no CA, ACL or CRL)
    assert run_fedge("secure", "add", "dev-2", "--dir", str(root))[0] == 0
    code, out, err = run_fedge("secure", "revoke", "dev-0", "--dir", str(root))
    assert code == 0 and "kill -HUP" not in out, err
    assert sorted(Registry.load(root / "registry.json").devices) == ["dev-1", "dev-2"]
    assert not (root / "certs" / "dev-2.crt").exists()


def test_signing_key_reuses_the_export_key(tmp_path, export_key):
    root = tmp_path / "keys"
    code, out, err = run_fedge("secure", "init", "--devices", "dev-0", "--out", str(root),
                               "--keys-only", "--signing-key", str(export_key.path))
    assert code == 0, err
    assert f"signing:    {export_key.path}" in out
    raw = json.loads((root / "credentials" / "aggregator.json").read_text())
    assert raw["signing_key"] == str(export_key.path.resolve())
    assert not (root / "certs" / "aggregator.signing.key").exists()
    assert PublicKey.load(root / "server.pub").key_id == export_key.key_id
    assert Credentials.load(root / "credentials" / "aggregator.json").signing_key == \
        export_key.path.resolve()


def test_secure_add_dashboard_issues_a_read_only_login_to_an_older_tls_fleet(tmp_path):
    root = tmp_path / "sec"
    code, _, err = run_fedge("secure", "init", "--devices", "dev-0", "--out", str(root))
    assert code == 0, err
    passwd = root / "broker" / "passwd"
    aggregator = [ln for ln in passwd.read_text().splitlines() if ln.startswith("aggregator:")]
    for rel in ("credentials/dashboard.json", "certs/dashboard.crt", "certs/dashboard.key"):
        (root / rel).unlink()  # as a fleet written before init issued it
    passwd.write_text(aggregator[0] + "\n")
    code, out, err = run_fedge("secure", "add", "dashboard", "--dir", str(root))
    assert code == 0 and "kill -HUP" in out, err
    lines = passwd.read_text().splitlines()
    assert lines[0] == aggregator[0] and lines[1].startswith("dashboard:$7$")  # kept, added
    creds = Credentials.load(root / "credentials" / "dashboard.json")
    assert creds.password and creds.cert == root / "certs" / "dashboard.crt"
    assert creds.signing_key is None and creds.registry == root / "registry.json"
    assert "user dashboard\ntopic read fedge/#\n" in (root / "broker" / "acl").read_text()
    assert stat.S_IMODE((root / "certs" / "dashboard.key").stat().st_mode) == 0o600


def test_max_payload_is_the_option_else_the_credentials_else_128_kib(tmp_path):
    # fedge secure init writes its broker's message limit (capped at 1 MiB) into every
    # client's credentials: the fleet's frames then travel whole, not in 128 KiB chunks.
    from device_runtime.credentials import DEFAULT_MAX_PAYLOAD, payload_limit
    from toolkit.deploy.secure_conf import Limits, client_payload

    assert client_payload(Limits()) == 1 << 20
    assert client_payload(Limits(max_message=512 * 1024)) == 512 * 1024
    assert client_payload(Limits(max_message=2048)) is None  # no chunk fits: the default
    path = tmp_path / "credentials" / "dev-0.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"username": "dev-0", "max_payload": 1 << 20}))
    assert payload_limit(None, path) == 1 << 20
    assert payload_limit(4096, path) == 4096  # --max-payload wins
    assert payload_limit(None, None) == DEFAULT_MAX_PAYLOAD == 128 * 1024
    path.write_text(json.dumps({"username": "dev-0"}))
    assert payload_limit(None, path) == DEFAULT_MAX_PAYLOAD
