"""Devices with valid credentials lie in their updates, live on a real Mosquitto: one
that registered a small shard (1% of the data) sends zeros claiming 10**15 samples,
one sends finite 1e30 weights. The aggregator weights each by at most what it
registered and refuses the blown-up change, so the job completes and its accuracy
stays within a few points of the run without them (issue 20, item 4). On the old code
the zeros replaced the model and 1e30 made the honest devices train into NaN."""
from __future__ import annotations

import queue
import threading
import time

import numpy as np
import pytest

from broker_server.service import Aggregator, ServeOptions
from broker_server.update_log import UpdateLog
from device_runtime import messages, wire
from device_runtime.agent import DeviceAgent
from device_runtime.topics import Topics
from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.transport.mqtt import MqttTransport
from testkit.brokers import Mosquitto
from testkit.timing import scaled
from tests.keys import KEYS, agent_options, status, task_of, trust, will

pytestmark = pytest.mark.slow  # whole jobs of agents and an aggregator over Mosquitto

HONEST, ROUNDS = 4, 5
SMALL = 40  # what the lying devices registered: 1% of the 4,000 training samples
CFG = ModelConfig("cnn1d", (40,), 10, width=0.5)


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq-guard")).start()
    yield m
    m.stop()


def _lies(kind: str, model: dict) -> tuple[dict, int]:
    """(tensors, meta.samples) of a hostile update against the round's ``model``."""
    if kind == "zeros":
        return {k: np.zeros_like(v) for k, v in model.items()}, 10**15
    return {k: np.full_like(v, 1e30) for k, v in model.items()}, 100


def _hostile(url: str, job: str, kind: str, registered: int, stop: threading.Event):
    """A client on a leaked device's credentials and signing key: registers
    ``registered`` samples, then answers every task with a lie (signed, with the task's
    nonce: everything but the content is genuine)."""
    topics, t = Topics(job), MqttTransport(url, kind)
    t.connect()
    tasks, models = queue.Queue(), {}
    t.subscribe(topics.task("+", kind), lambda _, p: tasks.put(p))
    t.subscribe(topics.model("+", "full"),
                lambda _, p: models.__setitem__(wire.decode(p).round, wire.decode(p).tensors))
    t.publish(topics.status(kind), status(job, messages.Status(
        kind, "online", "rpi4", registered, ts=time.time())), retain=True)
    while not stop.is_set():
        try:
            task = task_of(job, tasks.get(timeout=0.2))
        except queue.Empty:
            continue
        for _ in range(100):
            if task.round in models:
                break
            stop.wait(0.1)
        tensors, samples = _lies(kind, models[task.round])
        t.publish(topics.update(task.round, kind), wire.encode(wire.Frame(
            "update", job, task.round, kind, "fp32", tensors, meta={"samples": samples},
            nonce=task.nonce), signer=KEYS.device(kind)))
    t.close()


def _run(url: str, job: str, state, data, hostile: bool, rounds: int = ROUNDS
         ) -> tuple[dict, Aggregator]:
    (x, y), (xt, yt) = data
    import torch

    from toolkit.model.train import accuracy

    torch.manual_seed(0)
    model = build_model(CFG)
    init = weights_of(model)

    def evaluate(w):
        from device_runtime.training.local import load_weights

        load_weights(model, w)
        return accuracy(model, xt, yt)
    topics, stop, threads = Topics(job), threading.Event(), []
    agents = []
    for k, idx in enumerate(np.array_split(np.arange(len(y)), HONEST)):
        dev = f"dev-{k}"
        t = MqttTransport(url, dev, will=will(topics, dev))
        t.connect()
        agents.append(DeviceAgent(t, agent_options(job, dev, "rpi4"), x[idx], y[idx]))
        threads.append(threading.Thread(target=agents[-1].run, daemon=True))
    if hostile:
        for kind in ("zeros", "huge"):
            threads.append(threading.Thread(target=_hostile, daemon=True,
                                            args=(url, job, kind, SMALL, stop)))
    for th in threads:
        th.start()
    agg_t = MqttTransport(url, f"agg-{job}", persistent=True)
    agg_t.connect()
    n = HONEST + (2 if hostile else 0)
    opts = ServeOptions(job, state, rounds=rounds, min_devices=n, round_timeout=scaled(120.0),
                        epochs=2, lr=0.02)
    agg = Aggregator(agg_t, opts, CFG.to_json(), init, evaluate, trust=trust(job, state))
    result: dict = {}
    server = threading.Thread(target=lambda: result.update(agg.run()), daemon=True)
    server.start()
    server.join(timeout=scaled(600))
    stop.set()
    assert not server.is_alive(), "the job hung"
    for t in [agg_t, *(a.t for a in agents)]:
        t.close()
    return result, agg


def test_lying_devices_neither_replace_the_model_nor_hang_the_job(broker, tmp_path, mnist1d):
    ds = mnist1d
    data = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    honest, _ = _run(broker.url, "guard-honest", tmp_path / "a", data, hostile=False)
    attacked, agg = _run(broker.url, "guard-attacked", tmp_path / "b", data, hostile=True)
    rounds = attacked["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    assert np.isfinite([np.abs(w).max() for w in agg.weights.values()]).all()
    # Not replaced (that gave ~0.1): lowered by a few points at most. The zeros keep
    # their 1% share and pull the model 1% towards zero each round: measured 0.2 points
    # after 5 rounds on 2026-12-06 and 2.5 (0.938 -> 0.913, 'huge' alone: 0.938) on
    # 2026-12-07 with numpy 2.4.6, the same code; the share itself is asserted exactly
    # below (guard.weight).
    assert attacked["final_accuracy"] >= honest["final_accuracy"] - 0.04, \
        (honest["final_accuracy"], attacked["final_accuracy"])
    assert all("huge" in r["refused"] and "huge" not in r["accepted"] for r in rounds)
    reasons = [r["reason"] for r in attacked["rejected"] if r["device"] == "huge"]
    assert len(reasons) == ROUNDS and all("exceeds the bound" in why for why in reasons)
    assert agg.guard.registered["zeros"] == SMALL and agg.guard.weight("zeros", 10**15) == SMALL
    assert all("zeros" in r["accepted"] for r in rounds)  # with its own share, no more


def test_a_damaged_state_dir_is_named_and_the_job_goes_on(broker, tmp_path, mnist1d):
    """Issue 20, item 8: after round 1, the state dir gets a saved update whose header is
    of round 1 though it sits in round 2's log, a torn one after it, and a stray
    round-old folder. The restarted aggregator names both, asks their devices again and
    completes; the old code stopped on the torn update and raised ValueError on
    round-old."""
    ds, state = mnist1d, tmp_path / "state"
    data = (ds.x_train, ds.y_train), (ds.x_test, ds.y_test)
    first, _ = _run(broker.url, "guard-state", state, data, hostile=False, rounds=1)
    assert [r["round"] for r in first["rounds"]] == [1]
    t = MqttTransport(broker.url, "operator")  # round 1's stop would end the new devices
    t.connect()
    t.clear_retained(Topics("guard-state").control)
    t.close()
    model = {k: np.zeros_like(v) for k, v in weights_of(build_model(CFG)).items()}
    stale = wire.encode(wire.Frame("update", "guard-state", 1, "dev-1", "fp32", model,
                                   meta={"samples": 10**15}), signer=KEYS.device("dev-1"))
    log = UpdateLog(state / "round-2.log")
    log.append("dev-1", stale)
    log.append("dev-0", stale)
    log.close()
    with open(state / "round-2.log", "r+b") as f:
        f.truncate(len(stale) + len(stale) // 2)
    (state / "round-old").mkdir()
    report, agg = _run(broker.url, "guard-state", state, data, hostile=False, rounds=2)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][-1]["accepted"] == [f"dev-{k}" for k in range(HONEST)]
    why = {r["device"]: r["reason"] for r in report["rejected"]}
    assert "round-2.log: torn at byte" in why["dev-0"]
    assert "round-2.log" in why["dev-1"] and "round" in why["dev-1"]
    assert (state / "round-old").is_dir()
