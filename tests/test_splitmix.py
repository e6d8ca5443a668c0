"""SplitMix: the sampler covers every base, per-base averaging, budgets, bad budgets,
and a round over the real aggregator and device agents."""
import math

import numpy as np
import pytest

from broker_server.strategies import create
from broker_server.strategies.base import DeviceInfo
from broker_server.strategies.splitmix import (
    CyclicSampler,
    SplitMix,
    SplitMixOptions,
    average_bases,
    bases_for,
    subset,
)
from device_runtime.errors import ModelBuildError
from device_runtime.training.models import ModelConfig, build_model
from device_runtime.splitmix_variants import parse_variant, variant_name


def _devices(n, profile="rpi4"):
    return [DeviceInfo(f"d{k}", profile, 100) for k in range(n)]


@pytest.mark.parametrize("m,n", [(8, 1), (8, 3), (8, 8), (4, 10), (16, 5)])
def test_every_base_is_trained_within_ceil_m_over_n_rounds(m, n):
    s = SplitMix(options=SplitMixOptions(atom=1 / m, default_budget=1 / m))
    window = math.ceil(m / n)
    trained: list[set[int]] = []
    for r in range(1, 6 * window + 1):
        trained.append({i for a in s.assign(r, _devices(n)).values()
                        for i in parse_variant(a.variant)})
    for start in range(0, len(trained) - window + 1):
        covered = set().union(*trained[start:start + window])
        assert covered == set(range(m)), (start, covered)


def test_sampler_state_survives_a_restart():
    a = CyclicSampler(8, seed=3)
    first = [a.next() for _ in range(11)]
    b = CyclicSampler(8, seed=3)
    b.load(a.state())
    c = CyclicSampler(8, seed=3)
    seq = [c.next() for _ in range(16)]
    assert first == seq[:11] and [b.next() for _ in range(5)] == seq[11:]


@pytest.mark.parametrize("budget,atom,k", [(1.0, 0.125, 8), (0.5, 0.125, 4), (0.3, 0.125, 2),
                                           (0.01, 0.125, 1), (0.25, 0.25, 1), (0.75, 0.25, 3)])
def test_budget_maps_to_floor_budget_over_atom_bases(budget, atom, k):
    assert bases_for(budget, atom) == k
    s = SplitMix(options=SplitMixOptions(atom=atom, budgets={"d0": budget}))
    (a,) = s.assign(1, _devices(1)).values()
    assert len(parse_variant(a.variant)) == k


@pytest.mark.parametrize("opts,field", [
    (SplitMixOptions(atom=0.3), "atom"), (SplitMixOptions(atom=0), "atom"),
    (SplitMixOptions(budgets={"d0": -0.5}), "budgets['d0']"),
    (SplitMixOptions(budgets={"d0": 0}), "budgets['d0']"),
    (SplitMixOptions(budget_by_profile={"rpi4": 1.5}), "budget_by_profile['rpi4']"),
    (SplitMixOptions(default_budget=2.0), "default_budget")])
def test_bad_budgets_are_refused_naming_the_field(opts, field):
    with pytest.raises(ValueError) as e:
        SplitMix(options=opts)
    assert str(e.value).startswith(field)


def test_bases_nobody_trained_keep_their_weights_and_the_rest_average_by_samples():
    g = {f"bases.{i}.w": np.full(3, float(i), np.float32) for i in range(4)}
    u1 = {"bases.0.w": np.full(3, 10.0, np.float32), "bases.2.w": np.full(3, 20.0, np.float32)}
    u2 = {"bases.0.w": np.full(3, 40.0, np.float32)}
    out = average_bases(g, [(u1, 1.0), (u2, 3.0)])
    np.testing.assert_allclose(out["bases.0.w"], 32.5)  # (10 * 1 + 40 * 3) / 4
    np.testing.assert_allclose(out["bases.2.w"], 20.0)
    np.testing.assert_array_equal(out["bases.1.w"], g["bases.1.w"])
    np.testing.assert_array_equal(out["bases.3.w"], g["bases.3.w"])


def test_a_device_variant_holds_exactly_its_bases_under_global_names():
    cfg = ModelConfig("splitmix", (40,), 10, 0.125, kwargs={"base": "cnn1d", "bases": 8})
    full = build_model(cfg)
    part = build_model(cfg.replace(kwargs={**cfg.kwargs, "indices": [5, 2]}))
    g = {k: v.detach().numpy() for k, v in full.state_dict().items()}
    names = set(subset(g, [2, 5]))
    assert names == {k for k in part.state_dict()}
    assert parse_variant(variant_name([5, 2])) == [2, 5]
    with pytest.raises(ModelBuildError, match="indices"):
        build_model(cfg.replace(kwargs={**cfg.kwargs, "indices": [8]}))


def test_splitmix_is_known_to_the_aggregator_by_the_name_its_spec_registers():
    from toolkit import strategies

    strategies.get("splitmix")
    assert isinstance(create("splitmix"), SplitMix)


def test_a_splitmix_job_runs_end_to_end_and_uplink_follows_the_bases_trained():
    from toolkit.sim.simulate import SimOptions, run_simulation

    opts = SplitMixOptions(atom=0.25, budgets={"dev-0": 0.25, "dev-1": 0.5, "dev-2": 1.0})
    report, ckpt = run_simulation(SimOptions(devices=3, rounds=2, strategy="splitmix",
                                             epochs=1, strategy_options=opts))
    assert set(report["width_accuracy"]) == {"1", "2", "3", "4"}
    assert report["rejected"] == []
    per_base = {}
    for d in report["devices"]:
        k = opts.bases_of(d["id"], d["profile"])
        assert d["rounds_trained"] == 2
        per_base[d["id"]] = d["uplink_bytes"] / k
    assert max(per_base.values()) / min(per_base.values()) < 1.02
    macs = {d["id"]: d["macs"] for d in report["devices"]}
    assert macs["dev-2"] == 4 * macs["dev-0"] == 2 * macs["dev-1"]


@pytest.mark.parametrize("trainer", ["sgd", "fedmrn"])
def test_each_base_learns_alone_whatever_the_codec_trains(trainer):
    """A base must learn the same beside any partner: the bases are trained on their
    own losses (not on the averaged logits), by the plain trainer and by FedMRN's mask
    trainer alike, so the first k bases stand on their own at inference."""
    import torch

    from device_runtime.training.local import LocalTrainOptions
    from device_runtime.training.models import ModelConfig, build_model
    from device_runtime.training.splitmix import SplitMixNet

    rng = np.random.default_rng(0)
    xs, ys = rng.normal(size=(64, 40)).astype(np.float32), rng.integers(0, 10, 64)
    opts = LocalTrainOptions(epochs=1, batch_size=16, lr=0.05, seed=1)
    one = ModelConfig("cnn1d", (40,), 10, width=0.125)
    results = []
    for partner_scale in (1.0, 3.0):
        torch.manual_seed(0)
        a, b = build_model(one), build_model(one)
        with torch.no_grad():
            for p in b.parameters():
                p.mul_(partner_scale)
        pair = SplitMixNet({0: a, 1: b})
        if trainer == "sgd":
            from device_runtime.training.splitmix import train_bases

            res = train_bases(pair, xs, ys, opts)
        else:
            from device_runtime.training.fedmrn import train_fedmrn

            res = train_fedmrn(pair, xs, ys, opts, seed=1, device="d0")
        results.append({k: v for k, v in res.weights.items() if k.startswith("bases.0.")})
    assert results[0]
    for k in results[0]:
        np.testing.assert_allclose(results[0][k], results[1][k], rtol=1e-5, atol=1e-6,
                                   err_msg=k)
