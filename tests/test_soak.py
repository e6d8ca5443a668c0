"""The soak (issue 8): real processes under device kills, an aggregator kill and a broker
restart, with every round proven exactly-once and the aggregator's memory flat; and
the checker itself, shown to catch a double fold rather than pass vacuously."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from testkit.soak_check import Seen, check_history, check_round, slope
from testkit.timing import scaled
from broker_server.records import digest, rss_bytes
from broker_server.records import RoundState
from broker_server.service import Aggregator, ServeOptions
from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError
from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.topics import Topics
from device_runtime.transport.memory import MemoryHub, MemoryTransport
from tests.keys import trust

JOB = "soakunit"


def _updates(ref: dict, seed: int, devices: list[str]) -> list[tuple[str, bytes]]:
    """FedMRN update frames of round 1 from weights moved at random off ``ref``."""
    codec, rng, out = codecs.get("fedmrn"), np.random.default_rng(3), []
    for i, d in enumerate(devices):
        moved = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) if v.ndim else v
                 for k, v in ref.items()}
        tensors, params = codec.encode(moved, CodecContext(1, seed, ref, d))
        out.append((d, wire.encode(wire.Frame("update", JOB, 1, d, "fedmrn", tensors, params,
                                              {"samples": 40 + 10 * i, "variant": "full"}))))
    return out


def _round_one(tmp_path, double: str | None = None):
    """Round 1 through the real Aggregator (fold, record, checkpoint) with three updates;
    ``double``: a device whose update a buggy fold adds a second time, unrecorded."""
    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25)
    t = MemoryTransport(MemoryHub(), "agg")
    t.connect()
    agg = Aggregator(t, ServeOptions(JOB, tmp_path / "state", codec="fedmrn", rounds=1,
                                     min_devices=1), cfg.to_json(), weights_of(build_model(cfg)),
                     trust=trust(JOB, tmp_path / "state"))
    ref, seed = agg.weights, agg._task_seed(1)
    model_1 = wire.encode(wire.Frame("model", JOB, 1, "server", "fp32", ref))
    rs = RoundState(1, started=time.time())
    rs.fold = agg.strategy.fold(1, ref, agg.codec, CodecContext(1, seed, ref))
    sent = _updates(ref, seed, ["a", "b", "c"])
    for d, payload in sent:
        frame = wire.decode(payload)
        agg._fold_in(rs, frame, payload)
        if d == double:
            rs.fold.add(d, frame.meta["samples"], frame.tensors, frame.params)
    agg._close_round(rs)
    seen = Seen()
    seen.add_model(1, model_1, 0.0)
    seen.seeds[1] = {seed}
    for d, payload in sent:
        seen.add_update(1, d, payload)
    after = wire.encode(wire.Frame("model", JOB, 1, "server", "fp32", agg.weights))
    return agg.state.history[-1], seen, after, sent


def test_round_record_carries_the_evidence_and_the_checker_recomputes_it(tmp_path):
    rec, seen, after, sent = _round_one(tmp_path)
    assert rec["updates"] == [[d, digest(p)] for d, p in sent]  # in fold order
    assert rec["folded"] == 3 and rec["accepted"] == ["a", "b", "c"]
    assert rec["rss_bytes"] > 10 << 20 and rec["pid"] > 0
    assert rec["duplicates_so_far"] == 0 and rec["rejected_so_far"] == 0
    res = check_history([rec], seen, after, 1, "fedavg", "fedmrn")
    assert res["passed"], res["failures"]
    assert res["rounds_passed"] == 1 and res["double_fold_detectable"] == 1


def test_the_checker_catches_a_double_fold_and_every_forged_record(tmp_path):
    rec, seen, after, sent = _round_one(tmp_path, double="b")  # b folded twice
    fails = check_round(rec, seen, after, "fedavg", "fedmrn")["failures"]
    assert any("does not reproduce the next model" in f for f in fails), fails

    rec, seen, after, sent = _round_one(tmp_path / "honest")
    twice = {**rec, "updates": rec["updates"] + [rec["updates"][0]], "folded": 4}
    fails = check_round(twice, seen, after, "fedavg", "fedmrn")["failures"]
    assert any("listed twice" in f for f in fails) and \
        any("does not reproduce" in f for f in fails), fails
    assert any("folded 2 != 3" in f for f in check_round(
        {**rec, "folded": 2}, seen, after, "fedavg", "fedmrn")["failures"])
    forged = {**rec, "updates": [[d, "0" * 64 if d == "c" else s] for d, s in rec["updates"]]}
    assert any("nobody was seen sending" in f for f in check_round(
        forged, seen, after, "fedavg", "fedmrn")["failures"])
    seen.add_model(1, wire.encode(wire.Frame("model", JOB, 1, "server", "fp32",
                                             wire.decode(after).tensors)), 0.0)
    assert any("2 distinct model frames" in f for f in check_round(
        rec, seen, after, "fedavg", "fedmrn")["failures"])
    assert check_history([rec, {**rec}], Seen(), after, 1, "fedavg", "fedmrn")["failures"][0] \
        .startswith("rounds in the history")


def test_rss_and_slope():
    assert rss_bytes() > 10 << 20 and rss_bytes("no-such-pid") == 0
    assert abs(slope([1, 2, 3, 4], [10, 10.5, 11, 11.5]) - 0.5) < 1e-9
    assert slope([1, 2], [1, 2]) is None


def test_a_restarted_aggregator_resends_each_task_with_the_same_nonce(tmp_path):
    """Found by the soak: a restarted aggregator got queued updates before it reopened
    their round. They are refused now (no open task: nothing is held for a round not
    open), and nothing is lost: the restarted aggregator derives the same task nonce
    from its state dir, and a device answers a task it already answered with the
    update it sent."""
    first, again = trust(JOB, tmp_path / "state"), trust(JOB, tmp_path / "state")
    assert first.nonce(2, "a") == again.nonce(2, "a")
    assert len({first.nonce(2, "a"), first.nonce(3, "a"), first.nonce(2, "b"),
                trust(JOB, tmp_path / "other").nonce(2, "a")}) == 4
    gate = again.gate(Topics(JOB))
    with pytest.raises(WireError, match="no open task in round 2"):
        gate(Topics(JOB).update(2, "a"), b"FDG1queued", False)
    again.open_tasks["a"] = (2, again.nonce(2, "a"))
    gate(Topics(JOB).update(2, "a"), b"FDG1queued", False)  # the handler decodes it


def test_messages_queued_for_a_persistent_session_reach_handlers_subscribed_late(mosquitto):
    """Found by the soak: a restarted aggregator's queued updates came before it
    subscribed and were dropped; now they wait for the handler."""
    from device_runtime.transport.mqtt import MqttTransport

    first = MqttTransport(mosquitto.url, "late-sub", persistent=True)
    first.connect()
    first.subscribe("soak/+", lambda t, p: None)
    time.sleep(scaled(0.3))
    first.close()  # clean: the broker keeps the session and queues for it
    pub = MqttTransport(mosquitto.url, "late-pub")
    pub.connect()
    for i in range(3):
        pub.publish("soak/x", b"m%d" % i)
    assert pub.flush()
    again = MqttTransport(mosquitto.url, "late-sub", persistent=True)
    again.connect()
    time.sleep(scaled(0.5))  # loading state before subscribing, as the aggregator does
    got: list[bytes] = []
    again.subscribe("soak/+", lambda t, p: got.append(p))
    deadline = time.time() + scaled(5)
    while len(got) < 3 and time.time() < deadline:
        time.sleep(0.05)
    again.close()
    pub.close()
    assert got == [b"m0", b"m1", b"m2"]


@pytest.mark.slow
def test_soak_under_faults_every_round_exactly_once_and_flat_memory(tmp_path):
    from testkit.soak import SoakConfig, run_soak

    # 22 rounds keep CI near two minutes; bench/soak.py runs the 50-round schedule
    # (docs/results/soak.md). The aggregator is killed in round 9, mid-round or, when
    # that round closes first, just after: the restarted process runs 13 or 14 rounds,
    # at least 10 after its warm-up, enough to judge its memory either way (with 20
    # rounds, a kill after the close left it 9: not judged, and the soak failed).
    res = run_soak(SoakConfig(rounds=22, warmup=3, round_timeout=scaled(8.0),
                              max_seconds=scaled(1500.0), workdir=str(tmp_path / "soak")))
    (tmp_path / "soak.json").write_text(json.dumps(res, indent=1))  # for a post-mortem
    assert res["passed"], res["failures"]
    assert res["rounds_completed"] == 22
    kinds = [e["kind"] for e in res["faults"]]
    assert kinds.count("kill_aggregator") == 1 and kinds.count("restart_broker") == 1
    assert kinds.count("kill_device") >= 3 and kinds.count("restart_device") >= 3
    assert res["checks"]["rounds_passed"] == 22 and res["checks"]["updates_checked"] >= 100
    # Updates that reach a restarted aggregator before it reopens their round (queued for
    # its persistent session) are refused by its gate ("no open task"): nothing is held
    # for a round that is not open. None is lost: the reopened round re-sends each task
    # with the same nonce and the device answers with the update it sent, which the
    # exactly-once check of every round above has seen folded once.
    killed = next(e["round"] for e in res["faults"] if e["kind"] == "kill_aggregator")
    assert res["checks"]["rounds_passed"] >= killed + 1
