"""Evaluation on the devices (serve --eval-every): devices score the round's aggregate
on a held-out part of their shard that they never train on; the aggregator records
the sample-weighted mean, per profile and the spread, and refuses answers whose
figures are out of bounds."""
from __future__ import annotations

import queue
import threading

import numpy as np
import pytest

from broker_server.service import Aggregator, ServeOptions
from device_runtime import messages, wire
from device_runtime.agent import DeviceAgent
from device_runtime.data import holdout_split
from device_runtime.topics import Topics
from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.transport.mqtt import MqttTransport
from testkit.timing import scaled
from tests.keys import agent_options, resign, status, task_of, trust, will
from toolkit.errors import UsageError
from toolkit.field.jobs import BrokerSettings, EvalSettings, ScaleOutSettings, ServeJob

JOB = "deveval"


def test_holdout_is_stable_disjoint_and_per_device():
    x, y = np.arange(200, dtype=np.float32).reshape(100, 2), np.arange(100)
    (xt, yt), (xe, ye) = holdout_split(x, y, 0.2, "dev-1")
    assert len(ye) == 20 and len(yt) == 80 and not set(ye) & set(yt)
    assert np.array_equal(holdout_split(x, y, 0.2, "dev-1")[1][1], ye)  # a restart: same
    assert not np.array_equal(holdout_split(x, y, 0.2, "dev-2")[1][1], ye)
    assert len(holdout_split(x, y, 0.0, "dev-1")[1][1]) == 0


@pytest.mark.parametrize("make, needle", [
    (lambda: EvalSettings(every=-1), "--eval-every: expected >= 0"),
    (lambda: EvalSettings(every=2, holdout=1.0), "--holdout: expected a fraction in (0, 1)"),
    (lambda: ServeJob("j", "c", "s", scale_out=ScaleOutSettings(2), evaluation=EvalSettings(2),
                      broker=BrokerSettings("mqtt://h:1")),
     "--eval-every: expected without --workers"),
])
def test_bad_eval_settings_are_one_line_errors(make, needle):
    with pytest.raises(UsageError) as e:
        make()
    assert needle in str(e.value)


def test_devices_score_the_aggregate_and_bad_answers_are_refused(mosquitto, tmp_path):
    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25)
    topics = Topics(JOB)
    agg_t = MqttTransport(mosquitto.url, "agg", persistent=True)
    agg_t.connect()
    agg = Aggregator(agg_t, ServeOptions(JOB, tmp_path / "state", rounds=1, min_devices=2,
                                         round_timeout=scaled(40.0), epochs=1, eval_every=1,
                                         holdout=0.25),
                     cfg.to_json(), weights_of(build_model(cfg)),
                     trust=trust(JOB, tmp_path / "state"))
    result: dict = {}
    server = threading.Thread(target=lambda: result.update(agg.run()), daemon=True)
    server.start()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
    good_t = MqttTransport(mosquitto.url, "good", will=will(topics, "good"))
    good_t.connect()
    agent = DeviceAgent(good_t, agent_options(JOB, "good", "rpi4"), x, y)
    threading.Thread(target=agent.run, daemon=True).start()

    rogue = MqttTransport(mosquitto.url, "rogue")
    rogue.connect()
    tasks: queue.Queue = queue.Queue()
    models: queue.Queue = queue.Queue()
    rogue.subscribe(topics.task("+", "rogue"), lambda t, p: tasks.put(p))
    rogue.subscribe(topics.model("+", "full"), lambda t, p: models.put(p))
    rogue.publish(topics.status("rogue"), status(
        JOB, messages.Status("rogue", "online", "rpi3b", 50, ts=1.0)), retain=True)
    train = task_of(JOB, tasks.get(timeout=scaled(60)))
    model = wire.decode(models.get(timeout=scaled(60)))
    rogue.publish(topics.update(1, "rogue"), resign(wire.encode(wire.Frame(
        "update", JOB, 1, "rogue", "fp32", model.tensors, meta={"samples": 50})), "rogue",
        train.nonce))
    ev = task_of(JOB, tasks.get(timeout=scaled(60)))
    assert ev.uplink == "evaluate" and ev.round == 2 and ev.nonce != train.nonce

    def answer(**meta):
        rogue.publish(topics.update(2, "rogue"), resign(wire.encode(wire.Frame(
            "update", JOB, 2, "rogue", "eval", {}, meta=meta)), "rogue", ev.nonce))
    answer(samples=500, loss=1.0, accuracy=0.5)  # more than it registered
    answer(samples=10, loss=1.0, accuracy=1.5)
    answer(samples=10, loss=1.0, accuracy=0.5)
    server.join(timeout=scaled(120))
    assert not server.is_alive()
    for t in (rogue, good_t, agg_t):
        t.close()
    reasons = "\n".join(r["reason"] for r in result["rejected"])
    assert "meta.samples: expected an int in 0..50" in reasons, reasons
    assert "meta.accuracy: expected a number in [0, 1]" in reasons, reasons
    de = result["rounds"][0]["device_eval"]
    assert de["devices_reporting"] == 2 and de["model_round"] == 1
    good = de["devices"]["good"]
    assert good["samples"] == 16 and len(agent.y) == 48  # it never trained on those 16
    want = (good["accuracy"] * 16 + 0.5 * 10) / 26
    assert de["accuracy"] == pytest.approx(want, abs=1e-4) and de["samples"] == 26
    assert set(de["by_profile"]) == {"rpi4", "rpi3b"}
    assert de["by_profile"]["rpi3b"]["accuracy"] == 0.5
    assert de["spread"]["min"] == min(good["accuracy"], 0.5)


@pytest.mark.slow
def test_serve_without_a_central_test_set_reports_the_devices(mosquitto, tmp_path):
    """`fedge serve --eval-every 1` with a checkpoint that names no dataset and no
    --eval-data: no central accuracy, the devices' evaluation in every record."""
    import json

    from testkit.field import finish, prepare_job, start_device, start_server
    from toolkit.model import checkpoint

    ckpt = prepare_job(tmp_path, 2)
    bare = checkpoint.load(ckpt)
    bare.dataset = None
    checkpoint.save(bare, ckpt)
    server = start_server(mosquitto.url, "evj", tmp_path, ckpt, 2, 2, scaled(60),
                          ["--eval-every", "1", "--holdout", "0.3"])
    devices = [start_device(mosquitto.url, "evj", tmp_path, k) for k in range(2)]
    assert finish([server], 400) == [0], (tmp_path / "server.log").read_text()[-2000:]
    finish(devices)
    report = json.loads((tmp_path / "report.json").read_text())
    for rec in report["rounds"]:
        de = rec["device_eval"]
        assert rec["accuracy"] is None and de["devices_reporting"] == 2, rec
        assert 0.0 <= de["accuracy"] <= 1.0 and de["samples"] > 0, de
    assert "on devices: accuracy" in (tmp_path / "server.log").read_text()


@pytest.mark.parametrize("bad", [1.0, -0.1, "0.2", True])
def test_a_bad_holdout_in_the_plan_is_named(bad):
    from device_runtime.errors import InputArrayError

    x, y = np.zeros((10, 2), np.float32), np.zeros(10, np.int64)
    with pytest.raises(InputArrayError, match="plan.train.holdout: expected a fraction"):
        holdout_split(x, y, bad, "dev-1")
