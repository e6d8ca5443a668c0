"""The coded downlink: devices holding last round's model fetch only the coded change,
rebuild exactly the model the aggregator published, and fall back to the whole model
when they cannot."""
from __future__ import annotations

from device_runtime import wire
import threading

import numpy as np
import pytest

from broker_server.downlink import Downlink, downlink_codecs
from broker_server.service import Aggregator, ServeOptions
from device_runtime.agent import DeviceAgent
from device_runtime.errors import WireError
from device_runtime.model_sync import model_frame, rebuild
from device_runtime.topics import Topics
from device_runtime.training.local import weights_of
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.transport.memory import MemoryHub, MemoryTransport
from testkit.timing import scaled
from tests.conftest import assert_one_line_error, run_fedge
from tests.keys import agent_options, trust, will

JOB = "down"


def _models(seed: int = 0) -> tuple[dict, dict]:
    """Two successive global models: x2 = x1 + a change of FedMRN's shape."""
    import torch

    torch.manual_seed(seed)
    x1 = weights_of(build_model(ModelConfig("cnn1d", (40,), 10, width=1.0)))
    rng = np.random.default_rng(seed)
    x2 = {k: (v + rng.normal(0, 0.01, v.shape)).astype(np.float32) for k, v in x1.items()}
    return x1, x2


@pytest.mark.parametrize("codec", ["sign", "int8", "fedmrn", "signmix"])
def test_a_device_rebuilds_the_exact_model_from_the_change(codec):
    x1, x2 = _models()
    dl = Downlink(codec, JOB)
    first = dl.advance(x1, 1, seed=1)
    assert first.sync is None  # nothing held yet: the whole model
    second = dl.advance(x2, 2, seed=2)
    assert second.base_sha256 == wire.content_sha(first.frame)
    sha = wire.content_sha(second.frame)
    assert rebuild(JOB, 2, first.frame, second.sync, sha) == second.frame
    assert len(second.sync) < len(second.frame) / (1.8 if codec == "int8" else 8)


def test_the_error_stays_small_round_over_round():
    """A coded change is lossy; what devices hold stays near the server's model."""
    x1, x2 = _models()
    dl = Downlink("int8", JOB)
    dl.advance(x1, 1, seed=1)
    held = dl.advance(x2, 2, seed=2).weights
    for k in x2:
        assert np.abs(held[k] - x2[k]).max() <= np.abs(x2[k] - x1[k]).max() / 50 + 1e-7


def test_a_bad_sync_frame_or_base_is_refused_with_a_reason():
    x1, x2 = _models()
    dl = Downlink("sign", JOB)
    first, second = dl.advance(x1, 1, seed=1), dl.advance(x2, 2, seed=2 - 1)
    sha = wire.content_sha(second.frame)
    flipped = bytearray(second.sync)
    flipped[-3] ^= 0xFF  # a mask bit: decodes, but to another model
    with pytest.raises(WireError, match="sha256"):
        rebuild(JOB, 2, first.frame, bytes(flipped), sha)
    other = model_frame(JOB, 1, {k: v + 1 for k, v in x1.items()})
    with pytest.raises(WireError, match="sha256"):
        rebuild(JOB, 2, other, second.sync, sha)
    with pytest.raises(WireError):
        rebuild(JOB, 2, first.frame, second.sync[: len(second.sync) // 2], sha)


def test_fedmrn_codes_an_aggregate_in_a_bit_a_weight_far_closer_than_the_majority():
    """A FedMRN round moves each weight by noise * f, f the fraction of masks set, mostly
    0 or small; its entropy-coded levels cost at most a bit a weight and lose a fraction
    of what the majority (f > 0.5, one plain bit) loses."""
    from device_runtime import codecs, wire
    from device_runtime.codecs import CodecContext
    from device_runtime.codecs.fedmrn import layout, noise

    x1, _ = _models()
    rng, seed = np.random.default_rng(3), 2
    # As measured on cnn-wide: 64% of weights at 0, most of the rest at 0.1 to 0.3.
    frac = {k: rng.binomial(10, rng.beta(0.3, 3, v.shape)) / 10 for k, v in x1.items()}
    x2 = {k: (v + noise(k, v.shape, seed) * frac[k]).astype(np.float32) if v.ndim >= 2 else v
          for k, v in x1.items()}
    dl = Downlink("fedmrn", JOB)
    first, second = dl.advance(x1, 1, seed=1), dl.advance(x2, 2, seed=seed)
    sha = wire.content_sha(second.frame)
    assert rebuild(JOB, 2, first.frame, second.sync, sha) == second.frame
    codec, ctx = codecs.get("fedmrn"), CodecContext(2, seed, x1)
    masked = layout({k: v.shape for k, v in x1.items()})[0]
    n = sum(x1[k].size for k in masked)
    frame = wire.decode(second.sync)
    assert frame.tensors["codes"].size * 8 <= 1.0 * n
    majority = codec.decode(*codec.encode(x2, ctx), ctx)
    err = lambda w: sum(float(((w[k] - x2[k]) ** 2).sum()) for k in masked)
    assert err(second.weights) < 0.3 * err(majority)
    from device_runtime.codecs import fedmrn_change

    # Levels that are not numbers, a symbol with no level, a stream that is not LZMA2, or
    # one longer than the model: each refused with its reason, before any model is built.
    codes = frame.tensors["codes"]
    bad = [({"levels": [0.1, "x"]}, codes, "levels"),
           ({}, codes[::-1].copy(), "LZMA2"),
           ({}, np.frombuffer(fedmrn_change.pack(np.zeros(4 * n, np.uint8), 2), np.uint8),
            "bytes")]
    for change, tensor, reason in bad:
        forged = wire.encode(wire.Frame(
            "sync", JOB, 2, "server", "fedmrn", dict(frame.tensors, codes=tensor),
            {"codes": dict(frame.params["codes"], **change)}, frame.meta))
        with pytest.raises(WireError, match=reason):
            rebuild(JOB, 2, first.frame, forged, sha)
    with pytest.raises(WireError, match="no level"):
        fedmrn_change.unpack(fedmrn_change.pack(np.array([0, 3]), 2), 2, levels=3)


def test_a_restarted_aggregator_rebuilds_the_same_frames():
    x1, x2 = _models()
    x3 = {k: v * 0.99 for k, v in x2.items()}
    a = Downlink("fedmrn", JOB)
    a.advance(x1, 1, seed=1)
    held2 = a.advance(x2, 2, seed=2).weights
    third = a.advance(x3, 3, seed=3)
    b = Downlink("fedmrn", JOB)
    b.restore(held2, 2)  # what the state store keeps after round 2
    again = b.advance(x3, 3, seed=3)
    assert (again.frame, again.sync, again.base_sha256) == \
        (third.frame, third.sync, third.base_sha256)


def _fleet(tmp_path, downlink: str, rounds: int, devices: int = 3):
    cfg = ModelConfig("cnn1d", (40,), 10, width=0.25)
    hub, topics = MemoryHub(), Topics(JOB)
    agg_t = MemoryTransport(hub, "agg")
    agg_t.connect()
    agg = Aggregator(agg_t, ServeOptions(JOB, tmp_path / "state", codec="fedmrn",
                                         rounds=rounds, min_devices=devices,
                                         round_timeout=scaled(60.0), epochs=1, downlink=downlink),
                     cfg.to_json(), weights_of(build_model(cfg)),
                     trust=trust(JOB, tmp_path / "state"))
    rng = np.random.default_rng(0)
    agents = []
    for k in range(devices):
        t = MemoryTransport(hub, f"d{k}", will=will(topics, f"d{k}"))
        t.connect()
        x = rng.normal(size=(48, 40)).astype(np.float32)
        agents.append(DeviceAgent(t, agent_options(JOB, f"d{k}", "rpi4"), x,
                                  rng.integers(0, 10, 48)))
    return agg, agents


def _run(agg, agents, on_round=None) -> dict:
    for a in agents:
        threading.Thread(target=a.run, daemon=True).start()
    agg.on_round = on_round
    report = agg.run()
    for a in agents:
        a.t.close()
    return report


def test_devices_in_sync_fetch_only_the_change_and_a_stale_one_the_whole_model(tmp_path):
    agg, agents = _fleet(tmp_path, "fedmrn", rounds=4)
    # After round 2, device d0 forgets what it holds (as a restarted agent would).
    report = _run(agg, agents, lambda rec: setattr(agents[0], "held", None)
                  if rec["round"] == 2 else None)
    full = len(model_frame(JOB, 1, agg.weights))
    down = {a.device: {h["round"]: h["downlink_bytes"] for h in a.history} for a in agents}
    for dev, rounds in down.items():
        assert rounds[1] > full  # the whole model, and the task
        # The change only (and the signed task, ~1.3 KB: this test's model is tiny).
        assert rounds[2] < full / 6
    assert down["d0"][3] > full and down["d1"][3] < full / 6
    # The aggregator counts what the devices fetched (d0's report corrects its guess).
    by_round = {r["round"]: r["downlink_bytes"] for r in report["rounds"]}
    assert by_round == {r: sum(d[r] for d in down.values()) for r in range(1, 5)}
    assert report["downlink"] == "fedmrn" and not report["rejected"]


def test_the_whole_model_every_round_without_a_coded_downlink(tmp_path):
    agg, agents = _fleet(tmp_path, "fp32", rounds=2, devices=2)
    _run(agg, agents)
    full = len(model_frame(JOB, 1, agg.weights))
    assert all(h["downlink_bytes"] > full for a in agents for h in a.history)


@pytest.mark.slow
def test_bad_downlink_choices_are_one_line_errors(tmp_path, trained_ckpt):
    state = tmp_path / "state"
    code, _, err = run_fedge("serve", "--job", "j", "--checkpoint", str(trained_ckpt),
                             "--state-dir", str(state), "--downlink", "gzip")
    assert_one_line_error(code, err, 2, "--downlink", "gzip", *downlink_codecs())
    assert not state.exists()
    code, _, err = run_fedge("simulate", "--devices", "2", "--rounds", "1", "--strategy",
                             "heterofl", "--downlink", "sign", "--json",
                             str(tmp_path / "r.json"))
    assert_one_line_error(code, err, 2, "--downlink sign", "heterofl")
    assert not (tmp_path / "r.json").exists()


def test_signmix_codes_matrices_as_signs_and_vectors_as_float16():
    from device_runtime import codecs, wire
    from device_runtime.codecs import CodecContext

    x1, x2 = _models()
    codec, ctx = codecs.get("signmix"), CodecContext(round=2, seed=1, reference=x1)
    tensors, params = codec.encode(x2, ctx)
    frame = wire.decode(wire.encode(wire.Frame("sync", JOB, 2, "server", "signmix", tensors,
                                               params)),
                        wire.Expect(tensors=codec.wire_spec({k: v.shape for k, v in x1.items()})))
    out = codec.decode(frame.tensors, frame.params, ctx)
    for k, v in x2.items():
        delta = v - x1[k]
        if v.ndim >= 2:
            assert frame.tensors[k].dtype == np.uint8
            np.testing.assert_array_equal(out[k] - x1[k] >= 0, delta >= 0)
        else:
            assert frame.tensors[k].dtype == np.float16
            assert (np.abs(out[k] - v) <= np.abs(delta) * 2**-10 + 1e-6).all(), k
    with pytest.raises(WireError, match="reference"):
        codec.decode(frame.tensors, frame.params, CodecContext(round=2, seed=1))
    big = next(k for k, v in x1.items() if v.ndim >= 2)
    cut = {**frame.tensors, big: frame.tensors[big][:-1]}
    with pytest.raises(WireError, match=big):
        codec.decode(cut, frame.params, ctx)


def test_a_task_resent_while_the_device_fetches_its_model_is_trained_once(tmp_path):
    """The device handles messages while it waits for the round's model; a copy of the
    task among them (the aggregator re-sends tasks) trained the round twice and sent
    a second update (seen in CI: "trained 2 rounds" in a one-round job)."""
    agg, agents = _fleet(tmp_path, "fp32", rounds=2, devices=1)
    agent = agents[0]
    enqueue = agent._enqueue

    def twice(topic: str, payload: bytes) -> None:  # every task arrives twice, at once
        enqueue(topic, payload)
        if "/task/" in topic:
            enqueue(topic, payload)

    agent._enqueue = twice
    report = _run(agg, agents)
    assert agent.rounds_done == 2 and [h["round"] for h in agent.history] == [1, 2]
    assert not report["rejected"], report["rejected"]


def test_devices_in_one_process_rebuild_a_change_once(monkeypatch):
    # Ten simulated devices rebuilt the same cnn-wide model ten times a round (240 ms of
    # CPU); the process keeps what one rebuilt, and only a frame whose sha256 matched.
    from device_runtime import model_sync

    x1, x2 = _models()
    dl = Downlink("int8", JOB)
    first, second = dl.advance(x1, 1, seed=1), dl.advance(x2, 2, seed=2)
    held = (wire.content_sha(first.frame), first.frame)
    sha, sync_sha = wire.content_sha(second.frame), wire.content_sha(second.sync)
    calls = []
    real = model_sync.rebuild
    monkeypatch.setattr(model_sync, "rebuild", lambda *a: calls.append(a) or real(*a))
    shared = model_sync._Rebuilt()
    with pytest.raises(WireError, match="sha256"):  # not the model the task names
        shared.get(JOB, 2, held, second.sync, sync_sha, "0" * 64)
    got = [shared.get(JOB, 2, (held[0], bytes(first.frame)), second.sync, sync_sha, sha)
           for _ in range(3)]
    assert got[0] == second.frame and all(g is got[0] for g in got)
    assert len(calls) == 2 and not any(k[-1] == "0" * 64 for k in shared.items)
    # Another job's devices with the very same models get their own job's frame (the
    # header names the job; the sha256 names only the body).
    dl2 = Downlink("int8", "other")
    first2, second2 = dl2.advance(x1, 1, seed=1), dl2.advance(x2, 2, seed=2)
    assert wire.content_sha(second2.frame) == sha
    other = shared.get("other", 2, (wire.content_sha(first2.frame), first2.frame),
                       second2.sync, wire.content_sha(second2.sync), sha)
    assert other == second2.frame != second.frame


def test_the_next_rounds_frames_computed_ahead_are_the_ones_advance_gives():
    # The aggregator codes the next round's change while it evaluates the closing round;
    # what it then publishes is byte for byte what coding it in turn gives.
    x1, x2 = _models()
    x3 = {k: v + np.float32(0.001) for k, v in x2.items()}
    plain, ahead = Downlink("fedmrn", JOB), Downlink("fedmrn", JOB)
    for dl in (plain, ahead):
        dl.advance(x1, 1, seed=1)
    ahead.prepare(x2, 2, seed=2)
    got, want = ahead.advance(x2, 2, seed=2), plain.advance(x2, 2, seed=2)
    assert (got.frame, got.sync, got.base_sha256) == (want.frame, want.sync, want.base_sha256)
    ahead.prepare(x3, 3, seed=3)  # asked for another model: computed again, same result
    got, want = ahead.advance(dict(x3), 3, seed=3), plain.advance(x3, 3, seed=3)
    assert (got.frame, got.sync) == (want.frame, want.sync)
    ahead.prepare({"not": np.zeros(2, np.float32)}, 4, seed=4)  # a failure is the caller's
    with pytest.raises(Exception):
        ahead.advance(ahead._ahead.args[0], 4, seed=4)
