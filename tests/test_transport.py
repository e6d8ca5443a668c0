"""Transports against real brokers: embedded amqtt, a private Mosquitto, in-memory."""
from __future__ import annotations

import json
import queue
import random
import subprocess
import sys
import time

import numpy as np
import pytest

from broker_server.embedded import EmbeddedBroker
from device_runtime import chunking, wire
from device_runtime.backoff import Backoff
from device_runtime.transport.base import topic_matches
from device_runtime.transport.memory import MemoryHub, MemoryTransport
from device_runtime.transport.mqtt import MqttTransport
from device_runtime.transport.url import BrokerURL, TransportError
from testkit.brokers import Mosquitto
from testkit.timing import scaled
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def amqtt_url():
    with EmbeddedBroker() as b:
        yield b.url


@pytest.fixture(scope="module")
def mosquitto(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq")).start()
    yield m
    m.stop()


@pytest.fixture(params=["memory", "amqtt", "mosquitto"])
def pair(request, amqtt_url, mosquitto):
    """Two connected transports on the same broker."""
    made = []
    if request.param == "memory":
        hub = MemoryHub()
        make = lambda cid, **kw: MemoryTransport(hub, cid, **kw)
    else:
        url = amqtt_url if request.param == "amqtt" else mosquitto.url
        make = lambda cid, **kw: MqttTransport(url, cid, **kw)

    def factory(cid, **kw):
        t = make(f"{cid}-{random.randrange(1 << 30)}", **kw)
        t.connect()
        made.append(t)
        return t
    yield factory
    for t in made:
        t.close()


def _collector():
    q: queue.Queue = queue.Queue()
    return q, lambda topic, payload: q.put((topic, payload))


def _frame(n: int) -> bytes:
    x = np.random.default_rng(n).normal(size=n).astype(np.float32)
    return wire.encode(wire.Frame("update", "job", 3, "dev-1", "fp32", {"w": x}))


def test_publish_subscribe_and_large_frames_are_chunked(pair):
    a, b = pair("a", max_payload=16 * 1024), pair("b")
    q, h = _collector()
    b.subscribe("fedge/j/round/+/update/+", h)
    assert b.wait_subscribed(scaled(10))
    big, small = _frame(50_000), json.dumps({"status": "online"}).encode()
    sent = a.publish("fedge/j/round/3/update/dev-1", big)
    a.publish("fedge/j/round/3/update/dev-2", small)
    got = dict(q.get(timeout=scaled(10)) for _ in range(2))
    assert got["fedge/j/round/3/update/dev-1"] == big
    assert got["fedge/j/round/3/update/dev-2"] == small
    assert sent >= len(big) and a.stats.sent_messages >= 1 + len(big) // (16 * 1024)
    assert a.stats.by_topic_kind["update"] == sent + len(small)


def test_small_packets_leave_at_once_without_nagle(mosquitto):
    # With Nagle's algorithm a task or a PUBACK sent after an unacknowledged packet
    # waited for the peer's delayed ACK (up to 40 ms on Linux): a round of 4 devices
    # took 94 ms instead of 38 (docs/results/field.md). Reconnected sockets too.
    import socket

    t = MqttTransport(mosquitto.url, f"nodelay-{random.randrange(1 << 30)}")
    t.connect()
    try:
        sock = t._client.socket()
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        t.close()


def test_retained_messages_reach_late_subscribers_and_can_be_cleared(pair):
    a = pair("a", max_payload=8 * 1024)
    model = _frame(10_000)
    a.publish("fedge/r/round/1/model/full", model, retain=True)
    a.publish("fedge/r/plan", b'{"rounds": 3}', retain=True)
    time.sleep(scaled(0.3))
    b = pair("b")
    q, h = _collector()
    b.subscribe("fedge/r/round/+/model/full", h)
    b.subscribe("fedge/r/plan", h)
    got = dict(q.get(timeout=scaled(10)) for _ in range(2))
    assert got["fedge/r/round/1/model/full"] == model
    a.clear_retained("fedge/r/plan")
    a.clear_retained("fedge/r/round/1/model/full", chunks=len(model) // 8192 + 2)
    time.sleep(scaled(0.3))
    c = pair("c")
    q2, h2 = _collector()
    c.subscribe("fedge/r/#", h2)
    with pytest.raises(queue.Empty):
        q2.get(timeout=0.7)


def test_corrupted_chunk_is_reported_and_nothing_is_delivered():
    hub = MemoryHub()
    b = MemoryTransport(hub, "b")  # chunks are injected straight into the hub
    q, h = _collector()
    errors = []
    b.on_error = lambda topic, why: errors.append(why)
    b.subscribe("t/+", h)
    chunks = chunking.split(_frame(5000), 4096, "cid")
    bad = bytearray(chunks[1])
    bad[-1] ^= 0xFF
    for i, c in enumerate([chunks[0], bytes(bad), *chunks[2:]]):
        hub.publish(f"t/x/_c/{i}", c, False)
    hub.drain()
    assert q.empty() and errors


def test_last_will_announces_a_killed_device(mosquitto, amqtt_url):
    for url in (mosquitto.url, amqtt_url):
        watcher = MqttTransport(url, f"watch-{random.randrange(1 << 30)}")
        watcher.connect()
        q, h = _collector()
        watcher.subscribe("fedge/w/devices/+/status", h)
        script = (f"import time; from device_runtime.transport.mqtt import MqttTransport; "
                  f"t = MqttTransport({url!r}, 'victim', will=('fedge/w/devices/victim/status', "
                  f"b'offline')); t.connect(); print('up', flush=True); time.sleep(60)")
        p = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                             text=True)
        assert p.stdout.readline().strip() == "up"
        p.kill()
        p.wait()
        deadline = time.time() + scaled(20)
        while time.time() < deadline:
            topic, payload = q.get(timeout=scaled(20))
            if payload == b"offline":
                break
        assert payload == b"offline"
        watcher.clear_retained("fedge/w/devices/victim/status")
        watcher.close()


def test_reconnects_after_a_broker_restart(tmp_path):
    m = Mosquitto(tmp_path / "m").start()
    try:
        sub = MqttTransport(m.url, "sub", backoff=Backoff(base=0.1, cap=0.5))
        pub = MqttTransport(m.url, "pub", backoff=Backoff(base=0.1, cap=0.5))
        sub.connect(), pub.connect()
        q, h = _collector()
        sub.subscribe("fedge/x/+", h)
        m.restart(down_seconds=1.0)
        deadline = time.time() + scaled(15)
        while not (sub.connected and pub.connected) and time.time() < deadline:
            time.sleep(0.1)
        assert sub.reconnects >= 1 and sub.connected and pub.connected
        pub.publish("fedge/x/after", b"hello")
        assert q.get(timeout=scaled(10)) == ("fedge/x/after", b"hello")
        sub.close(), pub.close()
    finally:
        m.stop()


def test_a_publish_queued_while_disconnected_counts_as_acknowledged_after_the_reconnect(
        tmp_path):
    """paho keeps such a publish's NO_CONN code (``is_published`` raises for it) though it
    sends it after reconnecting: ``flush`` must see its PUBACK, not wait forever."""
    m = Mosquitto(tmp_path / "m").start()
    try:
        pub = MqttTransport(m.url, "pub", backoff=Backoff(base=0.1, cap=0.5))
        pub.connect()
        m.stop()
        deadline = time.time() + 15
        while pub.connected and time.time() < deadline:
            time.sleep(0.05)
        assert not pub.connected
        pub.publish("fedge/x/queued", b"hello")
        assert not pub.flush(0.2)  # not acknowledged while the broker is down
        m.start()
        assert pub.flush(15)
        pub.close()
    finally:
        m.stop()


def test_connect_errors_are_one_line(tmp_path):
    from broker_server.embedded import free_port

    t = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "nobody")
    with pytest.raises(TransportError, match="cannot connect to broker mqtt://127.0.0.1"):
        t.connect(timeout=1.0)
    with pytest.raises(TransportError, match="scheme must be mqtt or mqtts"):
        BrokerURL.parse("http://x:1")
    u = BrokerURL.parse("mqtts://dev%40a:s3cret@broker.local")
    assert (u.port, u.tls, u.username, u.password) == (8883, True, "dev@a", "s3cret")
    assert "s3cret" not in str(u)


def test_backoff_grows_with_jitter_and_resets():
    b = Backoff(base=1.0, cap=8.0, rng=random.Random(0))
    delays = [b.next_delay() for _ in range(10)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert delays[0] <= 1.0 and max(delays[4:]) > 1.0
    assert len(set(delays)) == len(delays)  # jittered, not lockstep
    b.reset()
    assert b.next_delay() <= 1.0


def test_topic_matching():
    assert topic_matches("a/+/c", "a/b/c") and not topic_matches("a/+/c", "a/b/c/d")
    assert topic_matches("a/#", "a") and topic_matches("a/#", "a/b/c")
    assert not topic_matches("a/b", "a/b/_c/0")


def test_username_and_password_from_the_url(tmp_path):
    import shutil

    if not shutil.which("mosquitto_passwd"):
        pytest.skip("mosquitto_passwd not installed")
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(pw), "alice", "s3cret"], check=True)
    m = Mosquitto(tmp_path / "m", extra_conf=f"password_file {pw}\n", anonymous=False).start()
    try:
        ok = MqttTransport(f"mqtt://alice:s3cret@127.0.0.1:{m.port}", "alice-1")
        ok.connect()
        ok.close()
        for url in (f"mqtt://alice:wrong@127.0.0.1:{m.port}", f"mqtt://127.0.0.1:{m.port}"):
            # the broker's "not authorized" ends the wait: no retrying until the timeout
            t0, limit = time.monotonic(), scaled(60.0)
            with pytest.raises(TransportError, match="refused the connection: (Not auth|Bad)"):
                MqttTransport(url, "intruder").connect(timeout=limit)
            assert time.monotonic() - t0 < limit / 2
    finally:
        m.stop()


def test_a_publish_during_a_lost_connection_is_kept_for_the_reconnect(monkeypatch):
    """paho keeps a QoS 1 message whose send failed with CONN_LOST and resends it after
    reconnecting; the transport must not turn that into an error (it once killed
    `fedge serve` during a broker restart)."""
    import paho.mqtt.client as paho

    t = MqttTransport("mqtt://127.0.0.1:1", "lost")
    for rc in (paho.MQTT_ERR_CONN_LOST, paho.MQTT_ERR_NO_CONN):
        info = paho.MQTTMessageInfo(1)
        info.rc = rc
        monkeypatch.setattr(t._client, "publish", lambda *a, **k: info)
        t.publish("fedge/x/y", b"payload")  # no exception
    info = paho.MQTTMessageInfo(2)
    info.rc = paho.MQTT_ERR_PAYLOAD_SIZE
    monkeypatch.setattr(t._client, "publish", lambda *a, **k: info)
    with pytest.raises(TransportError, match="publish to fedge/x/y failed"):
        t.publish("fedge/x/y", b"payload")


def test_a_chunk_flood_from_one_sender_is_refused_and_an_honest_update_completes(mosquitto):
    """A hostile client starts 200 chunked messages on its own update topics, each one
    byte; the receiver holds the first 16 (max_partials_per_sender), refuses the rest
    with a reason each, and an honest device's chunked update, sent meanwhile, arrives."""
    make = lambda cid, **kw: MqttTransport(mosquitto.url, f"{cid}-{random.randrange(1 << 30)}",
                                           **kw)
    server, evil, honest = make("server"), make("evil"), make("dev", max_payload=8 * 1024)
    for t in (server, evil, honest):
        t.connect()
    try:
        q, h = _collector()
        errors = []
        server.on_error = lambda topic, why: errors.append((topic, why))
        server.subscribe("fedge/j/round/+/update/+", h)
        time.sleep(scaled(0.3))
        update = _frame(20_000)
        for i in range(200):
            chunk = wire.encode(wire.Frame("chunk", "j", i + 1, "evil", "fp32",
                                           {"data": np.zeros(1, np.uint8)},
                                           chunk={"id": f"e{i}", "index": 0, "count": 2,
                                                  "sha256": "ab" * 32}))
            evil._publish_raw(f"fedge/j/round/{i + 1}/update/evil/_c/0", chunk, False)
            if i == 100:
                honest.publish("fedge/j/round/1/update/dev-1", update)
        topic, payload = q.get(timeout=scaled(30))
        assert (topic, payload) == ("fedge/j/round/1/update/dev-1", update)
        deadline = time.monotonic() + scaled(30)
        while len(errors) < 184 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(errors) == 184, errors[:3]
        assert all("incomplete messages from 'device/evil': expected at most 16" in why
                   for _, why in errors)
        assert server._reassembler.partials == 16
    finally:
        for t in (server, evil, honest):
            t.close()


def test_wait_subscribed_is_false_until_the_broker_granted_it():
    t = MqttTransport("mqtt://127.0.0.1:1", "never-connected")
    t.subscribe("fedge/j/plan", lambda topic, payload: None)
    assert t.wait_subscribed(0.2) is False  # no broker, no SUBACK
