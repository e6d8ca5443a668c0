"""MqttTransport over TLS with publishes from other threads than the network one (the
device's and the aggregator's usual case): every write happens on the network thread.

paho 2 writes a publish from the calling thread unless it runs its own loop thread; ours
is our own, so the calling thread wrote while the network thread read, in one OpenSSL
connection. Found by README's mutual-TLS run (issue 27): the broker logged "decryption
failed or bad record mac" and dropped the device; a flood of publishes from two sides
dropped it many times a second and once crashed the process ("free(): corrupted
unsorted chunks")."""
from __future__ import annotations

import threading
import time

import pytest

from device_runtime.transport.mqtt import MqttTransport
from testkit.brokers import mosquitto_binary
from testkit.timing import scaled
from tests.secure_helpers import creds_of, start_fleet

# slow: a TLS Mosquitto and a flood from threads, end to end (~6 s of the quick tier)
pytestmark = [pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed"),
              pytest.mark.slow]


def test_publishing_from_threads_while_receiving_keeps_the_tls_link_and_closes_cleanly(
        tmp_path):
    sec, broker, agg_port = start_fleet(tmp_path)
    fleet = (sec, broker, agg_port)
    kw = creds_of(fleet, "aggregator").transport_kwargs()
    url = f"mqtts://127.0.0.1:{agg_port}"
    try:
        a = MqttTransport(url, "tls-a", will=("fedge/tls/will", b"gone"), **kw)
        got = []
        a.subscribe("fedge/tls/in", lambda topic, payload: got.append(len(payload)))
        a.connect(scaled(10))
        b = MqttTransport(url, "tls-b", **kw)
        wills = []
        b.subscribe("fedge/tls/will", lambda topic, payload: wills.append(payload))
        b.connect(scaled(10))
        stop = threading.Event()

        def towards_a():  # keeps a's network thread reading
            while not stop.is_set():
                b.publish("fedge/tls/in", b"x" * 20_000)
                time.sleep(0.002)

        pump = threading.Thread(target=towards_a)
        pump.start()
        sent, end = 0, time.monotonic() + 4.0
        while time.monotonic() < end:  # and this thread writes on a's link meanwhile
            a.publish("fedge/tls/out", b"y" * 5_000)
            sent += 1
            time.sleep(0.001)
        stop.set()
        pump.join()
        assert a.flush(scaled(20)) and b.flush(scaled(20))
        assert (a.reconnects, b.reconnects) == (0, 0), (sent, len(got))
        assert got and sent > 100
        a.close()  # a clean DISCONNECT from the network thread: no last will
        time.sleep(1.0)
        b.close()
        assert wills == []
        log = (tmp_path / "mosq" / "mosquitto.log").read_text()
        assert "bad record mac" not in log and "Protocol error" not in log, log[-2000:]
        assert "Client tls-a disconnected." in log, log[-2000:]
    finally:
        broker.stop()
