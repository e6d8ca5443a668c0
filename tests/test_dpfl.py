"""dpfl (split learning): per-batch activations up and gradients down through the real
aggregator and agent; one device's round equals training the whole model locally; heads
averaged over whoever trained each stage; bad batches refused with a reason."""
from __future__ import annotations

import json
import secrets
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from device_runtime import wire
from device_runtime.errors import WireError
from testkit.field import finish, prepare_job, start_device, start_server
from testkit.timing import scaled
from toolkit import strategies

JOB = "dp"


def _data(n: int = 96, seed: int = 0):
    from toolkit.model import datasets

    ds = datasets.load("mnist1d")
    idx = np.random.default_rng(seed).choice(len(ds.y_train), n, replace=False)
    return ds, ds.x_train[idx], ds.y_train[idx]


def _one_round(cfg, weights, x, y, cut: int, rogue: bool = False):
    """One dpfl round, one device, over the in-memory transport: (report, new weights)."""
    from broker_server.service import Aggregator, ServeOptions
    from device_runtime.agent import DeviceAgent
    from tests.keys import agent_options, resign, task_of, trust
    from device_runtime.topics import Topics
    from device_runtime.transport.memory import MemoryHub, MemoryTransport
    from toolkit.strategies.server.dpfl import DPFLOptions, DPFLSetup

    strategies.get("dpfl")  # the aggregator then knows it by name
    hub = MemoryHub()
    transports = [MemoryTransport(hub, name) for name in ("dev-0", "server", "rogue")]
    for t in transports:
        t.connect()
    agent = DeviceAgent(transports[0], agent_options(JOB, "dev-0", "rpi4"), x, y)
    if rogue:  # as soon as the task is out, a batch of the wrong shape in the device's name
        bad = wire.encode(wire.Frame("acts", JOB, 1, "dev-0", "fp32",
                                     {"acts": np.ones((4, 3), np.float32),
                                      "labels": np.zeros(4, np.int64)},
                                     meta={"attempt": "x", "step": 0}))
        # Signed with dev-0's (leaked) key and its task's nonce: the shape check behind.
        transports[2].subscribe(Topics(JOB).task(1, "dev-0"), lambda _, task: transports[2]
                                .publish(Topics(JOB).acts(1, "dev-0"),
                                         resign(bad, "dev-0", task_of(JOB, task).nonce)))
    th = threading.Thread(target=agent.run, daemon=True)
    th.start()
    setup = DPFLSetup(cfg, {"rpi4": cut}, {cut: _act_shape(cfg, cut)}, DPFLOptions())
    with tempfile.TemporaryDirectory() as state:
        agg = Aggregator(transports[1], ServeOptions(JOB, Path(state), "dpfl", "fp32", 1, 1,
                                                     60.0, 1, 16, 0.05, seed=3,
                                                     strategy_options=setup),
                         cfg.to_json(), weights, trust=trust(JOB, Path(state)))
        report = agg.run()
    th.join(scaled(10))
    return report, agg.weights, agent.history


def _act_shape(cfg, cut: int) -> tuple[int, ...]:
    from toolkit.model.checkpoint import example_input
    from toolkit.model.zoo import build_model, split

    with torch.no_grad():
        return tuple(split(build_model(cfg), cut)[0].eval()(example_input(cfg, 2)).shape[1:])


@pytest.fixture(scope="module")
def setup():
    from device_runtime.training.local import weights_of
    from toolkit.model import zoo

    ds, x, y = _data()
    cfg = zoo.make_config("cnn", ds.sample_shape, ds.num_classes)
    torch.manual_seed(0)
    return cfg, weights_of(zoo.build_model(cfg)), x, y


def test_one_device_round_equals_training_the_whole_model_locally(setup):
    from device_runtime.training.local import LocalTrainOptions, load_weights, train_local
    from toolkit.model import zoo

    cfg, w0, x, y = setup
    report, got, hist = _one_round(cfg, w0, x, y, cut=2, rogue=True)
    model = zoo.build_model(cfg)
    load_weights(model, w0)
    want = train_local(model, x, y, LocalTrainOptions(1, 16, 0.05, seed=3 * 100_003 + 1)).weights
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
    # the rogue batch was refused with a reason and trained nothing (the weights above)
    assert any("acts: expected float32" in r["reason"] for r in report["rejected"])
    # six batches of 16: six exchanges, each an fp32 batch up and its gradient down
    per_batch = 16 * int(np.prod(_act_shape(cfg, 2))) * 4
    assert hist[0]["exchanges"] == 6
    assert 6 * per_batch < report["uplink_bytes_total"] - 4 < 6 * per_batch + 60_000


def test_heads_are_averaged_over_whoever_trained_each_stage(setup):
    from broker_server.strategies import Update
    from toolkit.strategies.server.dpfl import DPFL, DPFLSetup

    cfg, w0, _, _ = setup
    s = DPFL(options=DPFLSetup(cfg, {"a": 1, "b": 2}, {1: (0,), 2: (0,)}))
    s.fold(1, w0, type("C", (), {"name": "fp32"})(), None)
    s.trained = {1: 30}  # the server trained stages 1.. on 30 samples of the cut-1 device
    server = {k: v + 1.0 for k, v in w0.items()}
    from device_runtime.training.local import load_weights

    load_weights(s.model, server)
    s0 = [k for k in w0 if k.startswith("stages.0.")]
    s1 = [k for k in w0 if k.startswith("stages.1.")]
    a = Update("a", 1, {k: w0[k] + 2.0 for k in s0}, 30)  # cut 1: holds stage 0
    b = Update("b", 1, {k: w0[k] + 4.0 for k in s0 + s1}, 10)  # cut 2: stages 0 and 1
    out = s.aggregate(1, w0, [a, b])
    k0, k1 = s0[-1], s1[-1]
    np.testing.assert_allclose(out[k0], w0[k0] + (2 * 30 + 4 * 10) / 40, rtol=1e-6)
    np.testing.assert_allclose(out[k1], w0[k1] + (1 * 30 + 4 * 10) / 40, rtol=1e-6)
    last = [k for k in w0 if k.startswith("stages.")][-1]  # only the server trained it
    np.testing.assert_allclose(out[last], server[last], rtol=1e-6)


def test_bad_batches_are_refused_with_a_reason():
    from toolkit.strategies.server.dpfl import check_batch

    good = {"acts": np.ones((4, 8, 5), np.float32), "labels": np.arange(4, dtype=np.int64)}
    check_batch(good, (8, 5), 16, 10)
    cases = [({**good, "acts": np.ones((4, 5, 8), np.float32)}, "acts: expected float32"),
             ({**good, "acts": np.ones((20, 8, 5), np.float32)}, r"1\.\.16"),
             ({**good, "labels": np.arange(3)}, "labels: expected int64 \\(4,\\)"),
             ({**good, "labels": np.array([0, 1, 2, 10])}, "classes 0..9"),
             ({**good, "acts": good["acts"] * np.nan}, "finite"),
             ({"acts": good["acts"]}, "expected acts and labels")]
    for tensors, why in cases:
        with pytest.raises(WireError, match=why):
            check_batch(tensors, (8, 5), 16, 10)


@pytest.mark.slow
def test_bad_dpfl_options_are_one_line(tmp_path):
    from tests.conftest import assert_one_line_error, run_fedge

    code, _, err = run_fedge("simulate", "--strategy", "dpfl", "--codec", "sign",
                             "--json", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, 2, "--codec: dpfl sends its head whole")
    code, _, err = run_fedge("simulate", "--strategy", "dpfl", "--split-after", "9",
                             "--json", str(tmp_path / "x.json"))
    assert_one_line_error(code, err, 2, "split_after: expected one of 1, 2, 3, 4, got 9")
    assert not (tmp_path / "x.json").exists()


@pytest.mark.slow
def test_dpfl_over_mosquitto_with_planned_cuts(tmp_path, mosquitto):
    job, work = f"d{secrets.token_hex(3)}", tmp_path
    ckpt = prepare_job(work, devices=2)
    server = start_server(mosquitto.url, job, work, ckpt, rounds=2, min_devices=2,
                          round_timeout=scaled(90), extra=["--strategy", "dpfl", "--profiles",
                                                   "rpi3b,jetson-orin-nano"])
    devices = [start_device(mosquitto.url, job, work, k, p)
               for k, p in enumerate(["rpi3b", "jetson-orin-nano"])]
    codes = finish([server], timeout=240) + finish(devices, timeout=60)
    assert codes == [0, 0, 0], (work / "server.log").read_text()[-2000:]
    r = json.loads((work / "report.json").read_text())
    assert [x["devices_reporting"] for x in r["rounds"]] == [2, 2] and not r["rejected"]
    assert r["final_accuracy"] > 0.3
