"""The aggregator's heartbeat (broker_server/heartbeat.py): a device waiting for a task
keeps waiting while the aggregator is busy but alive, and gives up (its idle timeout)
once the heartbeats stop; a heartbeat of another run's session or signer is refused."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest

from broker_server.heartbeat import Heartbeat
from device_runtime import messages
from device_runtime.agent import DeviceAgent
from device_runtime.errors import UnauthenticatedError
from device_runtime.follow import ServerMessages
from device_runtime.keys import Signer
from device_runtime.topics import Topics
from device_runtime.training.models import ModelConfig
from device_runtime.transport.mqtt import MqttTransport
from testkit.timing import scaled
from tests.keys import KEYS, agent_options, trust, will

JOB = "hb"


def _plan(session: str) -> messages.Plan:
    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25).to_json()
    return messages.Plan(JOB, "fedavg", "fp32", 3, cfg, 1, 30.0, session=session,
                         issued=time.time())


def test_a_heartbeat_counts_only_from_the_followed_plans_session():
    tr = trust(JOB)
    server = ServerMessages(JOB, "d0", KEYS.server.public)
    beat = tr.seal(messages.Heartbeat(completed=1, ts=time.time()), nonce=tr.session)
    assert server.take_heartbeat(beat) is None  # no plan yet: nothing to bind it to
    server.take_plan(tr.seal(_plan(tr.session), nonce=tr.session))
    assert server.take_heartbeat(beat).completed == 1
    other = messages.seal(messages.Heartbeat(completed=1, ts=time.time()), JOB, "server",
                          KEYS.server, nonce="another-run")
    forged = messages.seal(messages.Heartbeat(completed=1, ts=time.time()), JOB, "server",
                           Signer.generate(), nonce=tr.session)
    for payload in (other, forged):
        with pytest.raises(UnauthenticatedError):
            server.take_heartbeat(payload)


@pytest.mark.slow  # waits out several idle timeouts on a real broker
def test_an_idle_device_waits_while_the_aggregator_beats_and_gives_up_after(mosquitto):
    tr, topics, idle = trust(JOB), Topics(JOB), scaled(1.5)
    every = idle / 5
    agg_t = MqttTransport(mosquitto.url, "agg")
    agg_t.connect()
    agg_t.publish(topics.plan, tr.seal(_plan(tr.session), nonce=tr.session), retain=True)
    dev_t = MqttTransport(mosquitto.url, "d0", will=will(topics, "d0"))
    dev_t.connect()
    rng = np.random.default_rng(0)
    agent = DeviceAgent(dev_t, agent_options(JOB, "d0", "rpi4", idle_timeout=idle),
                        rng.normal(size=(16, 40)).astype(np.float32), rng.integers(0, 10, 16))
    ended: list[float] = []
    runner = threading.Thread(target=lambda: (agent.run(), ended.append(time.time())),
                              daemon=True)
    busy = SimpleNamespace(t=agg_t, topics=topics, trust=tr, state=SimpleNamespace(completed=0))
    try:
        with Heartbeat(busy, every=every):  # a server training alone, for 3 timeouts
            runner.start()
            time.sleep(3 * idle)
            assert runner.is_alive() and not ended, "gave up while the aggregator beat"
            stopped = time.time()
        runner.join(idle + scaled(10.0))
        # counted from the last beat, at most one interval before the beats stopped
        assert ended and idle - every - 0.5 <= ended[0] - stopped <= idle + scaled(5.0)
        assert agent.server.refused == {}
    finally:
        agent.stopped = True
        dev_t.close()
        agg_t.close()
