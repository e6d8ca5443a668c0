"""Scale-out: aggregator workers on a shared subscription give the single aggregator's
result. The same updates go through a real Mosquitto to one Aggregator and to a
coordinator with three Worker loops; the new weights are compared round by round."""
from __future__ import annotations

import functools
import queue
import secrets
import threading
import time

import numpy as np
import pytest

from broker_server.coordinator import ScaleOut, ScaleOutOptions
from broker_server.scaleout import ScaleOutError, check_split
from broker_server.service import Aggregator, ServeOptions
from broker_server.strategies import SignSGD, SignSGDOptions
from broker_server.strategies.folds import FedMRNMean, MeanFold
from broker_server.strategies.vote_fold import VoteFold
from broker_server.workers import Worker, WorkerOptions
from device_runtime import codecs, messages, wire
from device_runtime.codecs import CodecContext
from device_runtime.codecs.base import is_statistic
from device_runtime.codecs.fedmrn import noise
from device_runtime.errors import WireError
from device_runtime.topics import Topics
from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.transport.mqtt import MqttTransport
from testkit.brokers import Mosquitto
from testkit.timing import scaled
from tests.keys import resign, status, task_of, trust

CFG = ModelConfig("cnn1d", (40,), 10, width=0.25)
DEVICES = [f"d{k}" for k in range(6)]
SEED = 3


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    m = Mosquitto(tmp_path_factory.mktemp("mosq-workers")).start()
    yield m
    m.stop()


@functools.cache
def _init() -> dict:
    """One initial model for every run (a fresh build would draw other weights)."""
    return weights_of(build_model(CFG))


def _update(job: str, codec_name: str, device: str, r: int, ref: dict, lie: bool = False
            ) -> bytes:
    """A deterministic update of ``device`` in round ``r`` against the model ``ref``;
    ``lie``: d4 sends its change x1000, d5 claims a million samples (its status: 55)."""
    k = int(device[1:])
    rng = np.random.default_rng([k, r])
    seed = SEED * 100_003 + r  # the aggregator's task seed
    w = {}
    for n, v in ref.items():
        if codec_name.startswith("fedmrn") and v.ndim >= 2:
            w[n] = ref[n] + noise(n, v.shape, seed) * rng.integers(0, 2, v.shape)
        elif is_statistic(n):
            w[n] = np.abs(v + rng.normal(size=v.shape)) + 0.5
        else:
            w[n] = v + 0.01 * rng.normal(size=v.shape) + (0.003 if k % 3 else -0.002)
        if lie and device == "d4":
            w[n] = ref[n] + 1000 * (w[n] - ref[n])
    samples = 1_000_000 if lie and device == "d5" else 20 + 7 * k
    codec = codecs.get(codec_name)
    t, p = codec.encode({n: x.astype(np.float32) for n, x in w.items()},
                        CodecContext(r, seed, ref, device))
    return wire.encode(wire.Frame("update", job, r, device, codec_name, t, p,
                                  {"samples": samples, "variant": "full"}))


class Fleet:
    """Fake devices on one connection: announce, answer each task with the update that
    ``_update`` makes from the round's retained model (``copies`` times: resends)."""

    def __init__(self, url: str, job: str, codec: str, copies: int = 1, lie: bool = False):
        self.topics, self.job, self.codec, self.copies = Topics(job), job, codec, copies
        self.lie = lie
        self.models: dict[int, dict] = {}
        self.tasks: queue.Queue = queue.Queue()
        self.t = MqttTransport(url, f"fleet-{job}", max_payload=1 << 24)
        self.t.connect()
        self.t.subscribe(self.topics.model("+", "full"), self._model)
        self.t.subscribe(self.topics.task("+", "+"), lambda t, p: self.tasks.put(p))
        for d in DEVICES:
            self.t.publish(self.topics.status(d), status(job, messages.Status(
                d, "online", "rpi4", 20 + 7 * int(d[1:]), ts=time.time())), retain=True)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _model(self, topic: str, payload: bytes) -> None:
        f = wire.decode(payload)
        self.models[f.round] = f.tensors

    def _serve(self) -> None:
        while True:
            task = task_of(self.job, self.tasks.get())
            while task.round not in self.models:
                threading.Event().wait(0.01)
            payload = resign(_update(self.job, self.codec, task.device, task.round,
                                     self.models[task.round], self.lie), task.device,
                             task.nonce)
            for _ in range(self.copies):
                self.t.publish(self.topics.update(task.round, task.device), payload)

    def close(self) -> None:
        for d in DEVICES:
            self.t.clear_retained(self.topics.status(d))
        self.t.close()


def _run(broker, tmp_path, strategy: str, codec: str, workers: int, copies: int = 1,
         rounds: int = 2, lie: bool = False) -> dict:
    job = f"w{secrets.token_hex(3)}"
    init = _init()
    opts_s = SignSGDOptions("mv", server_lr=0.01) if strategy == "signsgd" else None
    weights: list[dict] = []
    agg_t = MqttTransport(broker.url, f"agg-{job}", persistent=True, max_payload=1 << 24)
    agg_t.connect()
    scale = threads = None
    if workers:
        scale = ScaleOut(agg_t, job, ScaleOutOptions(workers, strategy, codec,
                                                     check_split(strategy, codec, opts_s)),
                         trust(job))
        threads, results = [], {}
        for i in range(workers):
            t = MqttTransport(broker.url, f"worker-{job}-{i}", persistent=True)
            t.connect()
            w = Worker(t, WorkerOptions(job, f"w{i}", tmp_path / job / f"w{i}"), trust(job))
            th = threading.Thread(target=lambda w=w, t=t: (results.update({w.id: w.run()}),
                                                           t.close()), daemon=True)
            th.start()
            threads.append(th)
    agg = Aggregator(agg_t, ServeOptions(job, tmp_path / job / "state", strategy, codec,
                                         rounds=rounds, min_devices=len(DEVICES),
                                         round_timeout=scaled(30), seed=SEED,
                                         strategy_options=opts_s),
                     CFG.to_json(), init, scale_out=scale,
                     trust=trust(job, tmp_path / job / "state"),
                     on_round=lambda rec: weights.append(dict(agg.weights)))
    fleet = Fleet(broker.url, job, codec, copies, lie)
    try:
        report = agg.run()
        if scale:
            scale.finish()
            for th in threads:
                th.join(timeout=scaled(20))
                assert not th.is_alive()
    finally:
        fleet.close()
        agg_t.close()
    out = {"weights": weights, "report": report}
    if scale:
        out.update(scale=scale.report(), workers=results)
    return out


def _assert_same(a: list[dict], b: list[dict], ulps: int) -> None:
    assert len(a) == len(b)
    for wa, wb in zip(a, b):
        for n in wa:
            if ulps == 0:
                np.testing.assert_array_equal(wa[n], wb[n], err_msg=n)
            else:
                np.testing.assert_array_max_ulp(wa[n], wb[n], maxulp=ulps)


@pytest.mark.parametrize("strategy,codec,ulps", [("fedavg", "fp32", 1),
                                                 ("fedavg", "fedmrn", 1),
                                                 ("signsgd", "sign", 0)])
def test_three_workers_give_the_single_aggregators_weights(broker, tmp_path, strategy,
                                                           codec, ulps):
    single = _run(broker, tmp_path, strategy, codec, workers=0)
    spread = _run(broker, tmp_path, strategy, codec, workers=3)
    # float64 sums merged in another order: equal up to float32 rounding (1 ulp); the
    # integer bit counts of 1-bit codecs are exact, and so are sign's float16 statistics.
    _assert_same(single["weights"], spread["weights"], ulps)
    if codec == "fedmrn":  # the mask part is integer sums: bit-identical
        for wa, wb in zip(single["weights"], spread["weights"]):
            for n, v in wa.items():
                if v.ndim >= 2:
                    np.testing.assert_array_equal(v, wb[n], err_msg=n)
    for rec in spread["scale"]["rounds"]:
        assert sum(rec["workers"].values()) == len(DEVICES)
        assert sum(1 for n in rec["workers"].values() if n) >= 2, rec  # really spread
    assert sum(w["accepted"] for w in spread["workers"].values()) == 2 * len(DEVICES)
    assert [r["devices_reporting"] for r in spread["report"]["rounds"]] == [6, 6]
    assert not spread["report"]["rejected"]


def test_an_update_on_two_workers_is_folded_once(broker, tmp_path):
    single = _run(broker, tmp_path, "fedavg", "fp32", workers=0, copies=2)
    spread = _run(broker, tmp_path, "fedavg", "fp32", workers=3, copies=2)
    _assert_same(single["weights"], spread["weights"], 1)
    counts = spread["workers"]
    # Two copies of each update went round-robin over three workers: every device was
    # held by two, reported first by one. 12 holdings of 6 devices per round: at most
    # one worker is asked for nothing, so a worker that is asked for some holds others
    # too and rebuilds its partial without them.
    # (a copy that reaches its worker after the round closed is refused as late: under
    # load the count can fall short of every copy, never of one per device and round)
    held = sum(w["accepted"] for w in counts.values())
    assert 2 * len(DEVICES) < held <= 2 * 2 * len(DEVICES), held
    assert sum(w["rebuilt"] for w in counts.values()) >= 2
    assert spread["report"]["duplicates"] >= 1
    for rec in spread["scale"]["rounds"]:
        assert sum(rec["workers"].values()) == len(DEVICES)


def test_workers_bound_weights_and_changes_as_the_aggregator_does(broker, tmp_path):
    """d5 claims a million samples (registered 55), d4 sends its change x1000: the
    workers cap the one and refuse the other, as the single aggregator does, and the
    coordinator does not wait for the refused device."""
    single = _run(broker, tmp_path, "fedavg", "fp32", workers=0, lie=True)
    spread = _run(broker, tmp_path, "fedavg", "fp32", workers=3, lie=True)
    _assert_same(single["weights"], spread["weights"], 1)
    honest = _run(broker, tmp_path, "fedavg", "fp32", workers=0)
    assert not np.allclose(honest["weights"][0]["stages.4.fc.weight"],
                           spread["weights"][0]["stages.4.fc.weight"])  # d4 left out
    for report in (single["report"], spread["report"]):
        assert [r["devices_reporting"] for r in report["rounds"]] == [5, 5]
        assert all(r["refused"] == ["d4"] for r in report["rounds"]), report["rounds"]
        assert report["rejected_total"] >= 2, report["rejected_by_reason"]
        # a round that waited out its 30 s deadline would have been the refused device's
        assert all(r["seconds"] < 25 for r in report["rounds"]), report["rounds"]
    for rec in spread["scale"]["rounds"]:
        assert sum(rec["workers"].values()) == len(DEVICES) - 1


def _ref(rng) -> dict:
    return {"conv.weight": rng.normal(size=(8, 3, 5)).astype(np.float32),
            "bn.weight": rng.normal(size=8).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 2, 8).astype(np.float32),
            "fc.weight": rng.normal(size=(10, 13)).astype(np.float32),
            "fc.bias": rng.normal(size=10).astype(np.float32)}


@pytest.mark.parametrize("kind", ["mean", "fedmrn", "vote"])
def test_partials_merge_to_the_whole_fold_and_a_bad_one_changes_nothing(kind):
    rng = np.random.default_rng(7)
    ref = _ref(rng)
    codec = codecs.get({"mean": "int8", "fedmrn": "fedmrn", "vote": "sign"}[kind])
    ctx = CodecContext(2, 9, ref)
    strat = SignSGD(options=SignSGDOptions("mv", server_lr=0.01))
    make = {"mean": lambda: MeanFold(codec, ctx), "fedmrn": lambda: FedMRNMean(codec, ctx),
            "vote": lambda: VoteFold(strat, 2, ref)}[kind]
    whole, parts = make(), [make() for _ in range(3)]
    for k in range(8):
        w = {n: v + 0.003 * k * rng.normal(size=v.shape).astype(np.float32)
             for n, v in ref.items()}
        t, p = codec.encode(w, CodecContext(2, 9, ref, f"d{k}"))
        whole.add(f"d{k}", 5 + k, t, p)
        parts[k % 3].add(f"d{k}", 5 + k, t, p)
    merged = make()
    for part in parts:
        tensors, meta = part.partial()
        wire_part = wire.decode(wire.encode(wire.Frame("partial", "j", 2, "w", codec.name,
                                                       tensors, meta=meta)))
        merged.merge_partial(wire_part.tensors, wire_part.meta)
    want = whole.result()
    got = merged.result()
    for n in ref:
        np.testing.assert_array_max_ulp(got[n], want[n], maxulp=1)
    tensors, meta = parts[0].partial()
    bad = dict(tensors)
    name = next(iter(bad))
    bad[name] = bad[name][:-1]
    before = make()
    with pytest.raises(WireError, match="partial tensor"):
        before.merge_partial(bad, meta)
    with pytest.raises(WireError):
        before.merge_partial(dict(tensors, extra=np.zeros(1, np.uint8)), meta)
    before.merge_partial(tensors, meta)  # the failed merges left it empty
    assert before.splittable and merged.splittable


def test_only_sums_split_over_workers():
    assert check_split("fedavg", "fedmrn") == {}
    assert check_split("signsgd", "sign", SignSGDOptions("mv")) == {"decoder": "mv"}
    for strategy, codec, opts in (("signsgd", "sign", None), ("splitmix", "fp32", None),
                                  ("fedavg", "act8", None)):
        with pytest.raises(ScaleOutError, match="valid: fedavg with --codec fp32"):
            check_split(strategy, codec, opts)
    ref = _ref(np.random.default_rng(1))
    fv = SignSGD().fold(1, ref, codecs.get("sign"), CodecContext(1, 0, ref))
    assert not fv.splittable
    with pytest.raises(NotImplementedError):
        fv.partial()
