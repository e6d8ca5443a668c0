"""FedMRN, sign voting and `fedge simulate`: the maths directly, the loop end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from broker_server.strategies.voting import (
    VotingWeights,
    majority_vote,
    reliability_weight,
    weighted_vote,
)
from device_runtime import codecs, wire
from device_runtime.codecs import CodecContext
from device_runtime.codecs.fedmrn import noise
from device_runtime.errors import WireError
from tests.conftest import run_fedge

SHAPES = {"conv.weight": (8, 4, 3), "bn.weight": (8,), "bn.running_mean": (8,),
          "fc.weight": (10, 8), "fc.bias": (10,), "norm.mean": ()}


def _weights(rng) -> dict:
    return {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("name", ["fedmrn", "fedmrn-signed"])
def test_fedmrn_sends_bits_and_the_server_rebuilds_reference_plus_noise_times_mask(name):
    codec, rng = codecs.get(name), np.random.default_rng(0)
    ref = _weights(rng)
    ctx = CodecContext(3, 1234, ref)
    masks, trained = {}, dict(_weights(rng))
    for k, s in SHAPES.items():
        if len(s) >= 2:
            m = rng.integers(0, 2, size=s).astype(np.float32)
            m = 2 * m - 1 if codec.signed else m
            masks[k] = m
            trained[k] = ref[k] + noise(k, s, 1234, codec.scale) * m
    tensors, params = codec.encode(trained, ctx)
    frame = wire.decode(wire.encode(wire.Frame("update", "j", 3, "d", name, tensors, params)),
                        wire.Expect(tensors=codec.wire_spec(SHAPES)))
    out = codec.decode(frame.tensors, frame.params, ctx)
    for k in SHAPES:
        if k in masks:
            np.testing.assert_array_equal(out[k], trained[k])
        elif k.endswith("running_mean"):
            np.testing.assert_allclose(out[k], trained[k], rtol=1e-3)  # float16 statistics
        else:
            np.testing.assert_array_equal(out[k], trained[k])
    masked = sum(int(np.prod(s)) for s in SHAPES.values() if len(s) >= 2)
    assert frame.tensors["mask"].nbytes == (masked + 7) // 8
    bad = dict(frame.params, mask=dict(frame.params["mask"], seed=99))
    with pytest.raises(WireError, match="seed"):
        codec.decode(frame.tensors, bad, ctx)


def test_fedmrn_local_training_moves_weights_only_along_the_noise():
    import torch

    from device_runtime.training.fedmrn import train_fedmrn
    from device_runtime.training.local import LocalTrainOptions, weights_of
    from device_runtime.training.models import ModelConfig, build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig("cnn1d", (40,), 10, width=0.25))
    ref = weights_of(model)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
    res = train_fedmrn(model, x, y, LocalTrainOptions(1, 16, 0.05), seed=7, device="d0")
    moved = 0
    for k, w in res.weights.items():
        if w.ndim >= 2:
            n = noise(k, w.shape, 7)  # the default scale, as the trainer used
            delta = w - ref[k]
            assert np.all(np.isclose(delta, 0, atol=1e-7) | np.isclose(delta, n, atol=1e-7))
            moved += int((~np.isclose(delta, 0, atol=1e-7)).sum())
    assert moved > 0


def test_fedmrn_masks_are_drawn_per_device_and_reproducible():
    """The round's noise is shared, but each device draws its own masks: two devices
    with equally sized shards once drew the same uniforms (one seed for all)."""
    import torch

    from device_runtime.training.fedmrn import train_fedmrn
    from device_runtime.training.local import LocalTrainOptions, weights_of
    from device_runtime.training.models import ModelConfig, build_model

    torch.manual_seed(0)
    init = weights_of(build_model(ModelConfig("cnn1d", (40,), 10, width=0.25)))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)

    def masks(device: str) -> dict[str, np.ndarray]:
        model = build_model(ModelConfig("cnn1d", (40,), 10, width=0.25))
        model.load_state_dict({k: torch.from_numpy(v) for k, v in init.items()})
        res = train_fedmrn(model, x, y, LocalTrainOptions(1, 16, 0.05, seed=3), seed=7,
                           device=device)
        return {k: w != init[k] for k, w in res.weights.items() if w.ndim >= 2}

    a, again, b = masks("pi-01"), masks("pi-01"), masks("pi-02")
    assert all(np.array_equal(a[k], again[k]) for k in a)
    agreement = np.mean(np.concatenate([(a[k] == b[k]).ravel() for k in a]))
    assert agreement < 0.95  # same data, same noise: only the devices' own draws differ


def test_votes_and_federated_voting_weights():
    s = [{"w": np.array([1, 1, -1], np.int8)}, {"w": np.array([1, -1, -1], np.int8)},
         {"w": np.array([-1, -1, 1], np.int8)}]
    np.testing.assert_array_equal(majority_vote(s)["w"], [1, -1, -1])
    np.testing.assert_array_equal(weighted_vote(s, [0.1, 0.1, 5.0])["w"], [-1, -1, 1])
    assert reliability_weight(0.5, 1.0) == pytest.approx(0.0)
    assert reliability_weight(0.9, 1.0) == pytest.approx(np.log(9), abs=1 / 512)  # 1/256 steps
    assert reliability_weight(1.0, 1.0) == 10.0 and reliability_weight(0.0, 0.0) == 1.0
    v = VotingWeights(gamma=1.0)
    decoded = {"w": np.array([1, 1, 1, 1], np.int8)}
    for _ in range(5):
        v.update("good", {"w": np.array([1, 1, 1, -1], np.int8)}, decoded)
        v.update("noisy", {"w": np.array([1, -1, -1, 1], np.int8)}, decoded)
    assert v.weight("good") == pytest.approx(np.log(3), abs=1 / 512) and v.weight("noisy") == 0.0
    pc = VotingWeights(per_coordinate=True, gamma=1.0)
    pc.update("d", {"w": np.array([1, -1], np.int8)}, {"w": np.array([1, 1], np.int8)})
    w = pc.weight("d")["w"]  # one round of history: Laplace keeps it near 0, not +-10
    assert w[0] == pytest.approx(np.log(2), abs=1 / 512) and w[1] == -w[0]
    for _ in range(200):
        pc.update("d", {"w": np.array([1, -1], np.int8)}, {"w": np.array([1, 1], np.int8)})
    w = pc.weight("d")["w"]
    assert w[0] > 5 and w[1] < -5


@pytest.mark.slow
def test_simulate_reports_traffic_per_device_and_simulated_time(tmp_path):
    out = tmp_path / "sim.json"
    code, _, err = run_fedge("simulate", "--devices", "4", "--rounds", "2", "--codec", "fedmrn",
                             "--profiles", "rpi3b,jetson-orin-nano", "--json", str(out))
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["codec"] == "fedmrn" and len(r["rounds"]) == 2
    assert {d["profile"] for d in r["devices"]} == {"rpi3b", "jetson-orin-nano"}
    for d in r["devices"]:
        assert d["macs"] > 0 and d["uplink_bytes"] > 0 and d["downlink_bytes"] > 0
    assert r["uplink_bytes_total"] == sum(d["uplink_bytes"] for d in r["devices"])
    assert all(x["simulated_seconds"] > 0 for x in r["rounds"])
    per_update = r["rounds"][0]["uplink_bytes"] / 4
    fp32_bytes = sum(d["downlink_bytes"] for d in r["devices"]) / 8  # model frames down
    assert per_update < fp32_bytes / 15


@pytest.mark.slow
def test_simulate_bad_arguments(tmp_path):
    from tests.conftest import assert_one_line_error

    code, _, err = run_fedge("simulate", "--codec", "zip", "--json", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "unknown codec 'zip'", "fedmrn")
    code, _, err = run_fedge("simulate", "--strategy", "signsgd", "--batch-sizes", "4,x",
                             "--json", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "--batch-sizes")
    code, _, err = run_fedge("simulate", "--strategy", "signsgd", "--sign-estimate", "pairs",
                             "--sign-per-coordinate", "--json", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "--sign-estimate pairs")
    code, _, err = run_fedge("simulate", "--strategy", "signsgd", "--server-lr-half-life", "-5",
                             "--json", str(tmp_path / "x"))
    assert_one_line_error(code, err, 2, "--server-lr-half-life")


def test_federated_voting_measures_each_device_against_the_others_vote():
    # 7 devices vote at random, 3 follow the truth: measured against the full vote
    # the random ones look as reliable as the good ones (they cast most of it);
    # against the others' vote they agree only by chance and lose their weight.
    from broker_server.strategies.voting import others_vote, vote_sums

    rng = np.random.default_rng(0)
    truth = np.where(rng.random(20000) < 0.5, 1, -1).astype(np.int8)
    signs = [{"w": np.where(rng.random(truth.size) < 0.5, 1, -1).astype(np.int8)}
             for _ in range(7)]
    signs += [{"w": np.where(rng.random(truth.size) < 0.8, truth, -truth).astype(np.int8)}
              for _ in range(3)]
    sums = vote_sums(signs, [1.0] * 10)
    v = VotingWeights(gamma=1.0)
    for k, s in enumerate(signs):
        v.update(f"d{k}", s, others_vote(sums, s, 1.0))
    noisy, good = [v.weight(f"d{k}") for k in range(7)], [v.weight(f"d{k}") for k in (7, 8, 9)]
    assert max(noisy) < 0.05 and min(good) > 0.1


def test_pairwise_reliability_recovers_each_devices_error_rate_without_a_vote():
    # The paper's mix: 6 devices at a tiny batch (signs 52% right), 4 at a large one
    # (65%). Against the others' vote (itself noisy) the gap shrinks; pairwise agreement
    # recovers v = 1 - 2p for each, so the weights come out near the true 7.7x apart.
    from broker_server.strategies.voting import others_vote, pairwise_reliability, vote_sums

    rng = np.random.default_rng(1)
    true_v = np.array([0.04] * 6 + [0.3] * 4)
    truth = np.where(rng.random(8192) < 0.5, 1, -1).astype(np.int8)
    s = np.stack([np.where(rng.random(truth.size) < (1 + v) / 2, truth, -truth)
                  for v in true_v]).astype(np.int8)
    v = pairwise_reliability(s)
    assert np.abs(v - true_v).max() < 0.05
    pairs, vote = VotingWeights(gamma=1.0), VotingWeights(gamma=1.0)
    sums = vote_sums([{"w": x} for x in s], [1.0] * len(s))
    for k, x in enumerate(s):
        pairs.record(f"d{k}", (1 + v[k]) / 2, 1)
        vote.update(f"d{k}", {"w": x}, others_vote(sums, {"w": x}, 1.0))
    ratio = lambda w: np.mean([w.weight(f"d{k}") for k in range(6, 10)]) / max(
        np.mean([w.weight(f"d{k}") for k in range(6)]), 1e-3)
    true = np.log(0.65 / 0.35) / np.log(0.52 / 0.48)  # 7.7
    # Measured: pairs 6.8, the others' vote 4.4.
    assert abs(ratio(pairs) - true) < 0.2 * true < true - ratio(vote)
    assert not pairwise_reliability(s[:2]).any()  # two devices do not identify v


def test_federated_voting_counts_a_tied_vote_as_no_evidence():
    # 15 devices, each right on 60% of coordinates: against the other 14, a fifth of
    # the coordinates tie. Counted as disagreements, ties gave every device a weight
    # below zero (the vote then inverted and training collapsed to chance).
    from broker_server.strategies import SignSGD, SignSGDOptions
    from broker_server.strategies.vote_fold import VoteFold
    from broker_server.strategies.voting import others_vote, vote_sums
    from device_runtime.codecs.sign import SignCodec

    rng = np.random.default_rng(0)
    truth = np.where(rng.random(4000) < 0.5, 1, -1).astype(np.int8)
    signs = [{"w": np.where(rng.random(truth.size) < 0.6, truth, -truth).astype(np.int8)}
             for _ in range(15)]
    sums, v = vote_sums(signs, [1.0] * 15), VotingWeights(gamma=1.0)
    for k, s in enumerate(signs):
        v.update(f"d{k}", s, others_vote(sums, s, 1.0))
    assert min(v.weight(f"d{k}") for k in range(15)) > 0.1
    ref = {"w": np.zeros(truth.size, np.float32)}
    strat = SignSGD(options=SignSGDOptions("fv", warmup_rounds=5))
    fold, codec = VoteFold(strat, 1, ref), SignCodec()
    for k, s in enumerate(signs):
        t, p = codec.encode({"w": s["w"].astype(np.float32) * 0.01},
                            CodecContext(1, 0, ref, f"d{k}"))
        fold.add(f"d{k}", 10, t, p)
    fold.result()
    assert min(strat.votes.weight(f"d{k}") for k in range(15)) > 0.1


def test_a_devices_weight_read_in_plain_floats_equals_the_vectorised_formula():
    # VotingWeights.weight computes a device's weight without numpy (it is read once per
    # update); it must stay the same number as reliability_weight, which the float path
    # and per-coordinate FV use.
    from broker_server.strategies.voting import _scalar_weight, reliability_weight

    rng = np.random.default_rng(9)
    totals = np.concatenate([[0.0, 1e-13, 1.0, 100.0], rng.uniform(0, 100, 2000)])
    for total in totals:
        for agree in (0.0, total, *rng.uniform(0, 1, 5) * total):
            assert _scalar_weight(agree, total) == float(reliability_weight(agree, total))
