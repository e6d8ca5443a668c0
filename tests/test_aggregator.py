"""The aggregator under bad input, live: every bad update is rejected with a
logged reason while the service keeps serving, and the run completes."""
from __future__ import annotations

import queue
import struct
import threading

import numpy as np
import pytest

from broker_server.service import Aggregator, ServeOptions
from broker_server.strategies.aggregate import PartialSum, weighted_average
from device_runtime import messages, wire
from device_runtime.agent import DeviceAgent
from device_runtime.topics import Topics
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.training.local import weights_of
from device_runtime.transport.mqtt import MqttTransport
from testkit.brokers import Mosquitto
from testkit.timing import scaled
from tests.keys import agent_options, resign, status, task_of, trust, will
from tests.test_wire import _pack, _parts, _rewrite

JOB = "badinput"


def _nan(frame: bytes) -> bytes:
    header, body = _parts(frame)
    body = bytearray(body)
    body[0:4] = struct.pack("<f", float("nan"))
    return _rewrite(frame, body=bytes(body))


def _bad_updates(good: bytes) -> dict[str, bytes]:
    header, body = _parts(good)
    first = header["tensors"][0]["name"]

    def retype(h):
        h["tensors"][0]["dtype"] = "int32"

    def reshape(h):
        t = h["tensors"][0]
        t["shape"] = [int(np.prod(t["shape"]))]
    return {
        "truncated": good[: len(good) // 2],
        "wrong magic": b"XXXX" + good[4:],
        "oversize header": good[:4] + struct.pack("<I", 70_000) + good[8:],
        "dtype mismatch": _rewrite(good, retype),
        "shape mismatch": _rewrite(good, reshape),
        "nan": _nan(good),
        "not json header": _pack(b"{nope", body),
    }, first


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq-agg")).start()
    yield m
    m.stop()


def test_bad_updates_are_rejected_while_the_aggregator_keeps_serving(broker, tmp_path):
    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25)
    init = weights_of(build_model(cfg))
    topics = Topics(JOB)
    agg_t = MqttTransport(broker.url, "agg", persistent=True)
    agg_t.connect()
    agg = Aggregator(agg_t, ServeOptions(JOB, tmp_path / "state", rounds=2, min_devices=2,
                                         round_timeout=scaled(30.0), epochs=1), cfg.to_json(), init,
                     trust=trust(JOB, tmp_path / "state"))
    result: dict = {}
    server = threading.Thread(target=lambda: result.update(agg.run()), daemon=True)
    server.start()

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
    good_t = MqttTransport(broker.url, "good", will=will(topics, "good"))
    good_t.connect()
    agent = DeviceAgent(good_t, agent_options(JOB, "good", "rpi4"), x, y)
    threading.Thread(target=agent.run, daemon=True).start()

    rogue = MqttTransport(broker.url, "rogue")
    rogue.connect()
    inbox = {"task": queue.Queue(), "model": queue.Queue()}
    rogue.subscribe(topics.task("+", "rogue"), lambda t, p: inbox["task"].put(p))
    rogue.subscribe(topics.model("+", "full"), lambda t, p: inbox["model"].put(p))
    rogue.publish(topics.status("rogue"), status(
        JOB, messages.Status("rogue", "online", "rpi3b", 50, ts=1.0)), retain=True)

    def next_of(kind):
        return inbox[kind].get(timeout=scaled(60))
    for r in (1, 2):
        task = task_of(JOB, next_of("task"))
        model = wire.decode(next_of("model"))
        assert task.round == r and model.round == r
        plain = wire.encode(wire.Frame("update", JOB, r, "rogue", "fp32", model.tensors,
                                       meta={"samples": 50}))
        good = resign(plain, "rogue", task.nonce)
        if r == 1:
            bad, _ = _bad_updates(plain)  # signed by rogue's own (valid) key
            for payload in bad.values():
                rogue.publish(topics.update(1, "rogue"), resign(payload, "rogue", task.nonce))
            rogue.publish(topics.update(7, "rogue"), good)  # wrong round
            ghost = resign(wire.encode(wire.Frame("update", JOB, 1, "ghost", "fp32",
                                                  model.tensors, meta={"samples": 5})), "ghost")
            rogue.publish(topics.update(1, "ghost"), ghost)  # unknown device
            rogue.publish(topics.update(1, "rogue"), good)
            rogue.publish(topics.update(1, "rogue"), good)  # duplicate
        else:
            rogue.publish(topics.update(2, "rogue"), good)
    server.join(timeout=scaled(120))
    assert not server.is_alive()
    for t in (rogue, good_t, agg_t):
        t.close()
    reasons = [r["reason"] for r in result["rejected"]]
    joined = "\n".join(reasons)
    for needle in ("magic", "header length", "dtype", "shape", "finite", "JSON",
                   "no open task in round 7", "'ghost' has no open task"):
        assert needle.lower() in joined.lower(), (needle, joined)
    assert len(reasons) >= 9  # seven malformed + wrong round + unknown device
    assert result["duplicates"] >= 1
    assert [r["round"] for r in result["rounds"]] == [1, 2]
    assert all(r["devices_reporting"] == 2 for r in result["rounds"])


def test_weighted_average_and_partial_sums_agree():
    rng = np.random.default_rng(1)
    ups = [({"w": rng.normal(size=(3, 4)).astype(np.float32),
             "b": rng.normal(size=4).astype(np.float32)}, float(n)) for n in (5, 10, 85)]
    avg = weighted_average(ups)
    expect = sum(u["w"].astype(np.float64) * n for u, n in ups) / 100
    np.testing.assert_allclose(avg["w"], expect, rtol=1e-6)
    left, right = PartialSum(), PartialSum()
    left.add(*ups[0])
    right.add(*ups[1])
    right.add(*ups[2])
    left.merge(right)
    np.testing.assert_allclose(left.mean()["b"], avg["b"], rtol=1e-6)
    with pytest.raises(ValueError):
        weighted_average([])
