"""fedge secure init: the layout and its refusals; then a real Mosquitto running the
generated config: strangers refused, every topic a device agent uses granted, a device
confined to its own topics, and a full round over mutual TLS. Identity and size limits
are in tests/test_secure_identity.py, add and revoke in tests/test_secure_fleet.py."""
from __future__ import annotations

import base64
import hashlib
import json
import queue
import secrets
import stat
import time

import numpy as np
import paho.mqtt.client as paho
import pytest

from device_runtime import wire
from device_runtime.credentials import Credentials, transport_kwargs
from device_runtime.topics import Topics
from device_runtime.transport.mqtt import MqttTransport
from device_runtime.transport.url import TransportError
from testkit.brokers import mosquitto_binary
from tests.conftest import assert_one_line_error, run_fedge
from testkit.field import finish, prepare_job, start_device, start_server
from testkit.timing import scaled
from tests.secure_helpers import CLIENTS, JOB, Raw, creds_of, module_fleet, wait_for

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
_fleet = pytest.fixture(scope="module", name="fleet")(module_fleet)


# --- the files ---------------------------------------------------------------------------


def test_secure_init_writes_the_layout_with_private_keys_0600(fleet):
    root, _, _ = fleet
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    secret = (["ca.key", "broker/server.key", "broker/passwd"]
              + [f"certs/{c}.{ext}" for c in CLIENTS for ext in ("key", "signing.key")]
              + [f"credentials/{c}.json" for c in CLIENTS]
              + ["certs/dashboard.key", "credentials/dashboard.json"])  # signs nothing
    assert files == sorted(
        secret + ["mosquitto.conf", "ca.crt", "broker/server.crt", "broker/acl",
                  "broker/crl.pem", "server.pub", "registry.json", "certs/dashboard.crt"]
        + [f"certs/{c}.crt" for c in CLIENTS])
    for rel in files:
        mode = stat.S_IMODE((root / rel).stat().st_mode)
        assert mode == (0o600 if rel in secret else 0o644), rel
    # only the aggregator and the dashboard have passwords: a device's certificate is its
    # identity
    hashes = dict(line.split(":", 1) for line in (root / "broker/passwd").read_text().split())
    assert sorted(hashes) == ["aggregator", "dashboard"]


def test_secure_init_writes_each_clients_credentials_and_signing_keys(fleet):
    from device_runtime.keys import PublicKey, Registry, Signer

    root, _, _ = fleet
    hashes = dict(line.split(":", 1) for line in (root / "broker/passwd").read_text().split())
    dash = json.loads((root / "credentials" / "dashboard.json").read_text())
    assert dash == {"username": "dashboard", "password": dash["password"],
                    "cert": "certs/dashboard.crt", "key": "certs/dashboard.key",
                    "ca": "ca.crt", "registry": "registry.json", "trust": "server.pub",
                    "max_payload": 1 << 20}
    raw = json.loads((root / "credentials" / "aggregator.json").read_text())
    assert raw == {"username": "aggregator", "password": raw["password"],
                   "cert": "certs/aggregator.crt", "key": "certs/aggregator.key",
                   "ca": "ca.crt", "signing_key": "certs/aggregator.signing.key",
                   "registry": "registry.json", "max_payload": 1 << 20}
    # every client of this broker (64 MiB messages) sends up to 1 MiB a message: a model
    # frame in one, not in 128 KiB chunks (35% of a 16-device round, docs/results/field.md)
    for c in CLIENTS:
        assert Credentials.load(root / "credentials" / f"{c}.json").max_payload == 1 << 20
    assert len(raw["password"]) >= 24
    # Mosquitto's $7$: PBKDF2-HMAC-SHA512, 101 iterations, 12-byte salt, 64-byte hash
    _, kind, rounds, salt, digest = hashes["aggregator"].split("$")
    assert (kind, rounds, len(base64.b64decode(salt))) == ("7", "101", 12)
    assert base64.b64decode(digest) == hashlib.pbkdf2_hmac(
        "sha512", raw["password"].encode(), base64.b64decode(salt), 101, 64)
    assert raw["password"] not in repr(creds_of(fleet, "aggregator"))
    # the signing keys: the registry holds each device's, the devices trust server.pub
    registry = Registry.load(creds_of(fleet, "aggregator").registry)
    agg = Signer.load(creds_of(fleet, "aggregator").signing_key)
    for d in CLIENTS[1:]:
        raw = json.loads((root / "credentials" / f"{d}.json").read_text())
        assert raw == {"username": d, "cert": f"certs/{d}.crt", "key": f"certs/{d}.key",
                       "ca": "ca.crt", "signing_key": f"certs/{d}.signing.key",
                       "trust": "server.pub", "max_payload": 1 << 20}
        creds = creds_of(fleet, d)
        assert creds.cert == root / "certs" / f"{d}.crt" and creds.ca == root / "ca.crt"
        assert creds.password is None and creds.trust == root / "server.pub"
        assert registry.get(d).raw() == Signer.load(creds.signing_key).public.raw()
        assert PublicKey.load(creds.trust).raw() == agg.public.raw()
    assert sorted(registry.devices) == list(CLIENTS[1:])


def test_secure_init_writes_the_brokers_conf_certificate_and_crl(fleet):
    from cryptography import x509

    root, broker, agg_port = fleet
    conf = (root / "mosquitto.conf").read_text()
    # who wrote the files, and can read them, is who a root-started broker runs as
    # (the default "mosquitto" could not: README's command as root, "Unable to open pwfile")
    from toolkit.deploy.secure_conf import current_user

    for line in (f"user {current_user()}", f"listener {broker.port}", f"listener {agg_port}",
                 "require_certificate true",
                 "allow_anonymous false", "per_listener_settings false",
                 f"cafile {root / 'ca.crt'}", f"crlfile {root / 'broker' / 'crl.pem'}",
                 f"password_file {root / 'broker' / 'passwd'}",
                 "use_identity_as_username true", "use_username_as_clientid true",
                 f"message_size_limit {64 << 20}", f"max_packet_size {(64 << 20) + 131072}",
                 "max_queued_messages 10000", f"max_queued_bytes {256 << 20}",
                 "set_tcp_nodelay true"):
        assert f"\n{line}\n" in conf, line
    # the identity settings are the devices' listener's, not the aggregator's
    assert conf.index("use_username_as_clientid") < conf.index(f"listener {agg_port}")
    server = x509.load_pem_x509_certificate((root / "broker/server.crt").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(n.value) for n in sans}
    assert {"localhost", "127.0.0.1", "::1", "10.1.2.3"} <= names
    crl = x509.load_pem_x509_crl((root / "broker/crl.pem").read_bytes())
    assert len(crl) == 0 and crl.is_signature_valid(
        x509.load_pem_x509_certificate((root / "ca.crt").read_bytes()).public_key())


def test_secure_init_refuses_bad_input_and_writes_nothing(tmp_path):
    out = tmp_path / "sec"
    for devices, needle in ((["pi-1", "aggregator"], "'aggregator' is the aggregator's id"),
                            (["pi-1", "pi/2"], "device id: expected 1-64"),
                            (["pi-1", "pi-1"], "'pi-1' given twice")):
        code, _, err = run_fedge("secure", "init", "--devices", *devices, "--out", str(out))
        assert_one_line_error(code, err, 2, "--devices", needle)
    for args, needle in ((["--port", "0"], "--port: expected 1-65535, got 0"),
                         (["--port", "9000", "--aggregator-port", "9000"],
                          "--aggregator-port: expected another port than --port 9000"),
                         (["--max-message", "10"], "--max-message: expected 1024-"),
                         (["--max-queued-bytes", "2048", "--max-message", "4096"],
                          "--max-queued-bytes: expected at least --max-message (4096)"),
                         (["--signing-key", str(tmp_path / "no.key")],
                          f"--signing-key: signing key {tmp_path / 'no.key'} does not exist")):
        code, _, err = run_fedge("secure", "init", "--devices", "pi-1", "--out", str(out),
                                 *args)
        assert_one_line_error(code, err, 2, needle)
    assert list(tmp_path.iterdir()) == []  # nothing, not even a staging folder
    out.mkdir()
    (out / "ca.key").write_text("the old key")
    code, _, err = run_fedge("secure", "init", "--devices", "pi-1", "--out", str(out))
    assert_one_line_error(code, err, 2, f"--out {out}: exists and is not an empty folder")
    assert [p.name for p in tmp_path.iterdir()] == ["sec"]
    assert [p.name for p in out.iterdir()] == ["ca.key"]
    assert (out / "ca.key").read_text() == "the old key"


def test_bad_credentials_give_one_line_errors(tmp_path, fleet):
    root = fleet[0]
    bad = tmp_path / "credentials" / "dev-0.json"  # DIR = tmp_path: no certs there
    bad.parent.mkdir()
    device = ["device", "--broker", "mqtts://localhost:1", "--job", JOB, "--id", "dev-0",
              "--profile", "rpi4", "--data", str(tmp_path / "none.npz"), "--credentials"]
    raw = json.loads((root / "credentials" / "dev-0.json").read_text())
    raw["password"] = "not-a-real-password"
    for text, needle in (("{not json", "not JSON"),
                         (json.dumps({**raw, "password": 7}),
                          "field 'password': expected a non-empty string, got int"),
                         (json.dumps({k: v for k, v in raw.items() if k != "key"}),
                          "field 'key': expected a non-empty string, got nothing"),
                         (json.dumps(raw), f"field 'cert': no file {tmp_path / 'certs'}"),
                         (json.dumps({"username": "dev-0", "signing_key": "certs/x.key"}),
                          f"field 'signing_key': no file {tmp_path / 'certs' / 'x.key'}"),
                         (json.dumps({"username": "dev-0", "trust": ""}),
                          "field 'trust': expected a non-empty string, got an empty string"),
                         (json.dumps({"username": "dev-0", "cert": "ca.crt"}),
                          "field 'key': expected a non-empty string, got nothing"),
                         (json.dumps({"username": "dev-0", "max_payload": 100}),
                          "field 'max_payload': expected an integer in 4096..268435455, "
                          "got 100"),
                         (json.dumps({"username": "dev-0", "max_payload": "1MiB"}),
                          "field 'max_payload': expected an integer in 4096..268435455, "
                          "got 1MiB")):
        bad.write_text(text)
        code, _, err = run_fedge(*device, str(bad))
        assert_one_line_error(code, err, 2, f"credentials {bad}", needle)
        assert raw["password"] not in err
    code, _, err = run_fedge(*device[:-1], "--credentials", str(tmp_path / "missing.json"))
    assert_one_line_error(code, err, 2, "cannot read")
    code, _, err = run_fedge(*device, str(root / "credentials" / "dev-1.json"))
    assert_one_line_error(code, err, 2, "they are for 'dev-1', not for this client 'dev-0'")
    code, _, err = run_fedge("serve", "--job", JOB, "--checkpoint", "x", "--state-dir",
                             str(tmp_path / "s"), "--credentials",
                             str(root / "credentials" / "aggregator.json"))
    assert_one_line_error(code, err, 2, "--credentials needs --broker")


# --- the broker ------------------------------------------------------------------------------


def test_strangers_are_refused_and_a_device_is_accepted(fleet, tmp_path):
    from toolkit.deploy import secure

    root, broker, agg_port = fleet
    # a certificate from another CA (someone else's fleet)
    key, other_key = secure.new_key(), secure.new_key()
    other = secure.make_ca(other_key, 1)
    (tmp_path / "other.crt").write_bytes(secure.cert_pem(secure.issue(other, other_key, key,
                                                                      "dev-0", 1)))
    (tmp_path / "other.key").write_bytes(secure.key_pem(key))
    foreign = transport_kwargs(root / "credentials" / "dev-0.json") | {
        "cert_file": str(tmp_path / "other.crt"), "key_file": str(tmp_path / "other.key")}
    # the aggregator's listener: its certificate and password, nothing less
    anonymous = Raw(fleet, None, port=agg_port)  # a valid certificate, no username
    wrong = Raw(fleet, "aggregator", password="not-the-password")
    device = Raw(fleet, "dev-0", port=agg_port)  # a device's certificate, no password
    agg_no_cert = Raw(fleet, "aggregator", cert=False)
    agg_plain = Raw(fleet, "aggregator", tls=False)
    assert [r.connack for r in (anonymous, wrong, device)] == ["Not authorized"] * 3
    assert (agg_no_cert.connack, agg_plain.connack) == (None, None)  # no TLS, no CONNACK
    # the devices' listener: a fleet certificate; the password is not what counts
    no_cert, plain = Raw(fleet, "dev-0", cert=False), Raw(fleet, "dev-0", tls=False)
    assert (no_cert.connack, plain.connack) == (None, None)
    for r in (anonymous, wrong, device, agg_no_cert, agg_plain, no_cert, plain):
        r.close()
    for port in (broker.port, agg_port):
        t = MqttTransport(f"mqtts://localhost:{port}", "stranger", **foreign)
        with pytest.raises(TransportError, match="cannot connect"):
            t.connect(timeout=2)
    t = MqttTransport(f"mqtts://localhost:{broker.port}", "dev-0",
                      **transport_kwargs(root / "credentials" / "dev-0.json", "dev-0"))
    t.connect(timeout=scaled(5))
    assert t.connected
    t.close()
    t = MqttTransport(f"mqtts://localhost:{agg_port}", "fedge-x-aggregator",
                      **transport_kwargs(root / "credentials" / "aggregator.json"))
    t.connect(timeout=scaled(5))
    assert t.connected
    t.close()


def _agent_patterns() -> list[str]:
    """The topic filters a device agent subscribes to (its chunk twins included)."""
    from device_runtime.agent import DeviceAgent
    from device_runtime.transport.memory import MemoryHub, MemoryTransport
    from tests.keys import agent_options

    class Recording(MemoryTransport):
        def _subscribe_raw(self, pattern: str) -> None:
            self.__dict__.setdefault("patterns", []).append(pattern)
            super()._subscribe_raw(pattern)

    t = Recording(MemoryHub(), "dev-0")
    t.connect()
    DeviceAgent(t, agent_options(JOB, "dev-0", "rpi4", idle_timeout=0.05),
                np.zeros((1, 40), np.float32), np.zeros(1, np.int64)).run()
    return t.patterns


def test_the_acl_grants_a_device_agent_every_topic_it_uses(fleet):
    """Each filter the agent subscribes to receives what the aggregator publishes there,
    and every topic a device publishes on (chunks of frames too) reaches the aggregator."""
    topics = Topics(JOB)
    patterns = _agent_patterns()
    assert any("/_c/+" in p for p in patterns) and len(patterns) >= 10
    # A round's model and its coded change are subscribed to only while a task fetches
    # them (agent._fetch), so the idle agent above did not: add them and their chunks.
    for fetched in (topics.model("+", "+"), topics.sync("+", "+")):
        patterns += [fetched, fetched + "/_c/+"]
    agg, dev = Raw(fleet, "aggregator"), Raw(fleet, "dev-0")
    assert dev.subscribe(*patterns) == ["Granted QoS 1"] * len(patterns)
    assert agg.subscribe(f"fedge/{JOB}/#") == ["Granted QoS 1"]
    concrete = [p.replace("+", "1") for p in patterns]  # one topic under each filter
    for topic in concrete:
        assert agg.publish(topic, b"to the device") == "Success"
    wait_for(lambda: dev.messages.qsize() >= len(concrete), "the device's messages")
    assert sorted(t for t, _ in dev.received()) == sorted(concrete)
    agg.received()
    mine = [topics.status("dev-0"), topics.update(1, "dev-0"), topics.acts(1, "dev-0")]
    mine += [t + "/_c/0" for t in mine[1:]]
    for topic in mine:
        assert dev.publish(topic, b"from the device") == "Success"
    wait_for(lambda: agg.messages.qsize() >= len(mine), "the aggregator's messages")
    assert sorted(t for t, _ in agg.received()) == sorted(mine)
    agg.close()
    dev.close()
    # and the transport's own chunking end to end: a 20 kB frame in 2 kB chunks
    frame = wire.encode(wire.Frame("update", JOB, 1, "dev-0", "fp32",
                                   {"w": np.ones(5000, np.float32)}))
    got: queue.Queue = queue.Queue()
    a = MqttTransport(f"mqtts://localhost:{fleet[2]}", "agg-t",
                      **creds_of(fleet, "aggregator").transport_kwargs())
    d = MqttTransport(f"mqtts://localhost:{fleet[1].port}", "dev-t", max_payload=2048,
                      **creds_of(fleet, "dev-0").transport_kwargs())
    a.connect()
    d.connect()
    a.subscribe(topics.update(), lambda t, p: got.put((t, p)))
    assert a.wait_subscribed(scaled(10))  # the broker granted it: what follows reaches it
    d.publish(topics.update(1, "dev-0"), frame)
    assert got.get(timeout=scaled(5)) == (topics.update(1, "dev-0"), frame)
    d.close()
    a.close()


def test_the_dashboard_login_reads_the_job_and_may_publish_nothing(fleet):
    """What fedge dashboard subscribes to reaches it; whatever it publishes is refused
    (MQTT 5: PUBACK "Not authorized"), so a leaked dashboard login cannot drive a job."""
    topics = Topics(JOB)
    agg = Raw(fleet, "aggregator")
    dash = Raw(fleet, "dashboard", port=fleet[2], protocol=paho.MQTTv5)
    assert dash.connack == "Success"
    watched = [topics.plan, topics.summary, topics.status()]
    assert dash.subscribe(*watched) == ["Granted QoS 1"] * 3
    sent = [topics.plan, topics.summary, topics.status("dev-0")]
    for topic in sent:
        assert agg.publish(topic, b"for the dashboard") == "Success"
    wait_for(lambda: dash.messages.qsize() >= 3, "the dashboard's messages")
    assert sorted(t for t, _ in dash.received()) == sorted(sent)
    agg.subscribe(f"fedge/{JOB}/#")
    for topic in (topics.plan, topics.control, topics.task(1, "dev-0"), topics.summary,
                  topics.status("dev-0"), topics.update(1, "dev-0")):
        assert dash.publish(topic, b"forged") == "Not authorized", topic
    time.sleep(scaled(0.3))
    assert all(p != b"forged" for _, p in agg.received())
    agg.close()
    dash.close()


def test_a_device_can_neither_forge_nor_read_another_devices_update(fleet):
    topics = Topics(JOB)
    agg = Raw(fleet, "aggregator")
    agg.subscribe(topics.update())
    # Publishing in B's name: MQTT 3.1.1 has no way to say no (PUBACK 0, message dropped);
    # MQTT 5 gets PUBACK reason 0x87 "Not authorized". A's own update then arrives, after
    # where the forged ones would have been (one publisher's messages keep their order).
    # One connection at a time: the broker makes A's username its client id.
    a5 = Raw(fleet, "dev-0", protocol=paho.MQTTv5)
    assert a5.publish(topics.update(1, "dev-1"), b"forged 5") == "Not authorized"
    assert a5.publish(topics.update(1, "dev-0"), b"own 5") == "Success"
    a5.close()
    a, b = Raw(fleet, "dev-0"), Raw(fleet, "dev-1")
    assert a.publish(topics.update(1, "dev-1"), b"forged 3.1.1") == "Success"
    assert a.publish(topics.update(1, "dev-0"), b"own") == "Success"
    wait_for(lambda: agg.messages.qsize() >= 2, "A's own updates")
    time.sleep(scaled(0.2))
    assert sorted(agg.received()) == sorted([(topics.update(1, "dev-0"), b"own 5"),
                                             (topics.update(1, "dev-0"), b"own")])
    # Reading B's updates: mosquitto 2.0 grants the subscription (SUBACK QoS 1) and
    # applies the ACL at delivery, so A never gets them.
    spying = [topics.update(1, "dev-1"), topics.update("+", "dev-1"), topics.update(),
              f"fedge/{JOB}/#", "#"]
    assert a.subscribe(*spying) == ["Granted QoS 1"] * len(spying)
    assert b.publish(topics.update(1, "dev-1"), b"B's update") == "Success"
    # A's subscriptions work (it gets its task, sent after B's update), B's update reached
    # the aggregator, and A got only its task
    assert agg.publish(topics.task(1, "dev-0"), b"A's task") == "Success"
    wait_for(lambda: not a.messages.empty(), "A's task")
    wait_for(lambda: not agg.messages.empty(), "B's update at the aggregator")
    time.sleep(scaled(0.2))
    assert agg.received() == [(topics.update(1, "dev-1"), b"B's update")]
    assert set(a.received()) == {(topics.task(1, "dev-0"), b"A's task")}
    for r in (agg, a, b):
        r.close()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [[], ["--workers", "2", "--codec", "fedmrn"]],
                         ids=["aggregator", "workers"])
def test_a_full_round_over_mutual_tls(fleet, tmp_path, workers):
    # With --workers, the workers connect with the aggregator's credentials and the ACL
    # must let them take a shared subscription and publish under workers/.
    root, broker, agg_port = fleet
    job, work = f"tls{secrets.token_hex(3)}", tmp_path
    ckpt = prepare_job(work, devices=2)
    url = f"mqtts://localhost:{broker.port}"
    server = start_server(f"mqtts://localhost:{agg_port}", job, work, ckpt, rounds=2,
                          min_devices=2, round_timeout=scaled(60),
                          extra=["--credentials", str(root / "credentials/aggregator.json"),
                                 *workers])
    devices = [start_device(url, job, work, k, extra=[
        "--credentials", str(root / "credentials" / f"dev-{k}.json")]) for k in range(2)]
    codes = finish([server], timeout=120) + finish(devices, timeout=60)
    assert codes == [0, 0, 0], (work / "server.log").read_text()[-2000:]
    r = json.loads((work / "report.json").read_text())
    assert [x["round"] for x in r["rounds"]] == [1, 2]
    assert [x["devices_reporting"] for x in r["rounds"]] == [2, 2]
    # Nothing refused but a late copy of an update already folded (a re-sent task's answer
    # or a QoS 1 redelivery after its round closed): the gate holds none.
    # (under load a device's statuses may also cross on the way; an older one is refused)
    assert all("no open task" in x["reason"] or (x["kind"] == "status" and "(replayed)"
               in x["reason"]) for x in r["rejected"]), r["rejected"]
    assert r["broker"] == f"mqtts://localhost:{agg_port}"
    if workers:
        assert sum(r["scale_out"]["updates_by_worker"].values()) == 4, r["scale_out"]
