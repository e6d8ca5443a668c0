"""fedge secure init on a real Mosquitto: a device's certificate is its identity (it
can neither act as another device nor knock another's session off) and the broker's
size limits hold."""
from __future__ import annotations

import time

import paho.mqtt.client as paho
import pytest

from device_runtime.topics import Topics
from testkit.brokers import mosquitto_binary
from testkit.timing import scaled
from tests.secure_helpers import JOB, Raw, module_fleet, start_fleet, wait_for

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
_fleet = pytest.fixture(scope="module", name="fleet")(module_fleet)


# --- identity -------------------------------------------------------------------------------


def test_a_devices_certificate_is_its_identity(fleet):
    """dev-1's certificate with dev-0's username (and any password) acts as dev-1: dev-0's
    topics are refused; on the aggregator's listener it is refused outright."""
    topics = Topics(JOB)
    agg = Raw(fleet, "aggregator")
    agg.subscribe(topics.update())
    posing = Raw(fleet, "dev-0", as_cert="dev-1", password="anything", protocol=paho.MQTTv5)
    assert posing.connack == "Success"
    assert posing.publish(topics.update(1, "dev-0"), b"as dev-0") == "Not authorized"
    assert posing.publish(topics.update(1, "dev-1"), b"as dev-1") == "Success"
    posing.close()
    wait_for(lambda: not agg.messages.empty(), "dev-1's update")
    time.sleep(scaled(0.2))
    assert agg.received() == [(topics.update(1, "dev-1"), b"as dev-1")]
    agg.close()
    for username in ("dev-0", "aggregator"):
        r = Raw(fleet, username, as_cert="dev-1", password="anything", port=fleet[2])
        assert r.connack == "Not authorized", username
        r.close()


def test_a_device_cannot_take_over_another_clients_session(fleet):
    """Logged in as dev-1 with dev-0's (or the aggregator's) client id, a client gets its
    own username as client id, so the other stays connected and keeps receiving."""
    topics = Topics(JOB)
    victim = Raw(fleet, "dev-0", client_id=f"fedge-{JOB}-dev-0")
    agg = Raw(fleet, "aggregator", client_id=f"fedge-{JOB}-aggregator")
    assert (victim.connack, agg.connack) == ("Success", "Success")
    victim.subscribe(topics.task(1, "dev-0"))
    for stolen in [f"fedge-{JOB}-dev-0", f"fedge-{JOB}-aggregator"] * 3:
        thief = Raw(fleet, "dev-1", client_id=stolen)
        assert thief.connack == "Success"
        thief.close()
    time.sleep(scaled(0.5))
    assert (victim.disconnects, agg.disconnects) == (0, 0)
    assert agg.publish(topics.task(1, "dev-0"), b"task") == "Success"
    wait_for(lambda: not victim.messages.empty(), "dev-0's task")
    victim.close()
    agg.close()


# --- sizes --------------------------------------------------------------------------------------


def test_the_broker_drops_an_oversize_message(tmp_path):
    """--max-message 4096: 4096 bytes pass, 4097 are dropped, and a packet past
    max_packet_size disconnects its sender before the broker reads it. (MQTT 3.1.1, as
    the transport speaks: Mosquitto's PUBACK 0x83 to an MQTT 5 client breaks paho 2.)"""
    f = start_fleet(tmp_path, "--max-message", "4096", devices=("dev-0",))
    try:
        topics = Topics(JOB)
        agg = Raw(f, "aggregator")
        agg.subscribe(topics.update())
        dev = Raw(f, "dev-0")
        assert dev.publish(topics.update(1, "dev-0"), b"y" * 4097) == "Success"  # dropped
        assert dev.publish(topics.update(1, "dev-0"), b"x" * 4096) == "Success"
        assert dev.disconnects == 0
        dev.c.publish(topics.update(1, "dev-0"), b"z" * (4096 + 128 * 1024 + 1), qos=1)
        wait_for(lambda: dev.disconnects >= 1, "the oversize sender's disconnection")
        dev.close()
        wait_for(lambda: not agg.messages.empty(), "the 4096-byte update")
        time.sleep(scaled(0.3))
        assert [len(p) for _, p in agg.received()] == [4096]
        agg.close()
    finally:
        f[1].stop()
