"""The robust step through FedAvg's real fold equals the numpy reference (rules.*,
clipping.*) on the same decoded updates, with fp32 and int8 codecs; the round
record and the job report carry the rule and DP's epsilon; the FV vote cap folds
as the float vote with capped weights does."""
import numpy as np
import pytest

from broker_server.robust import clipping, parse_rule, rules
from broker_server.robust.accountant import epsilon
from broker_server.robust.votes import cap_vote_weights
from broker_server.strategies import FedAvg, FedAvgOptions, SignSGD, SignSGDOptions
from broker_server.strategies.folds import DecodeAll
from broker_server.strategies.robust import RobustFold
from broker_server.strategies.vote_fold import VoteFold
from device_runtime import codecs
from device_runtime.codecs import CodecContext
from device_runtime.errors import WireError


def _ref(rng):
    return {"conv.weight": rng.normal(size=(4, 3, 5)).astype(np.float32),
            "fc.weight": rng.normal(size=(10, 6)).astype(np.float32),
            "fc.bias": rng.normal(size=10).astype(np.float32)}


def _round(codec_name, robust, n=9, seed=0, dp_seed=None):
    """(FedAvg, fold result, decoded updates, samples): n updates, 2 of them boosted."""
    rng = np.random.default_rng(seed)
    ref = _ref(rng)
    strat = FedAvg(options=FedAvgOptions(robust=robust, dp_seed=dp_seed))
    codec, ctx = codecs.get(codec_name), CodecContext(1, 7, ref)
    fold = strat.fold(1, ref, codec, ctx)
    assert isinstance(fold, RobustFold)
    decoded, samples = [], []
    for k in range(n):
        scale = 30.0 if k < 2 else 0.1
        w = {name: v + scale * rng.normal(size=v.shape).astype(np.float32)
             for name, v in ref.items()}
        t, p = codec.encode(w, CodecContext(1, 7, ref, f"d{k}"))
        fold.add(f"d{k}", 10 + k, t, p)
        decoded.append(codec.decode(t, p, ctx))
        samples.append(float(10 + k))
    return strat, fold, fold.result(), decoded, samples, ref


def _close(a, b):
    for k in b:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("codec", ["fp32", "int8"])
@pytest.mark.parametrize("rule", ["median", "trimmed:0.2", "krum:2", "multikrum:2:4"])
def test_keeping_fold_equals_the_numpy_rule(codec, rule):
    _, fold, got, ups, samples, _ = _round(codec, parse_rule(rule))
    opts = parse_rule(rule)
    want = {"median": lambda: rules.median(ups),
            "trimmed": lambda: rules.trimmed_mean(ups, opts.beta),
            "krum": lambda: rules.krum(ups, opts.f),
            "multikrum": lambda: rules.multi_krum(ups, opts.f, opts.m, samples)}[opts.rule]()
    _close(got, want)
    rec = fold.record()["robust"]
    assert rec["rule"] == opts.describe() and rec["devices"] == 9
    if opts.rule in ("krum", "multikrum"):  # the boosted devices are never chosen
        assert rec["chosen"] and not {"d0", "d1"} & set(rec["chosen"])


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_streaming_clip_equals_the_clipped_mean(codec):
    _, fold, got, ups, samples, ref = _round(codec, parse_rule("mean", clip=1.0))
    assert not fold.kept  # a fixed bound folds as the updates arrive
    _close(got, clipping.clipped_mean(ups, ref, bound=1.0, samples=samples))
    assert fold.record()["robust"]["clipped"] >= 2


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_adaptive_clip_equals_the_quantile_clipped_mean(codec):
    _, fold, got, ups, samples, ref = _round(codec, parse_rule("mean", clip_quantile=0.5))
    _close(got, clipping.clipped_mean(ups, ref, quantile=0.5, samples=samples))
    norms = np.linalg.norm(clipping.changes(ups, ref)[0], axis=1)
    assert fold.record()["robust"]["bound"] == pytest.approx(np.quantile(norms, 0.5), 1e-5)


def test_dp_fold_equals_dp_mean_with_the_same_noise_and_reports_epsilon():
    opts = parse_rule("mean", clip=1.0, dp_noise=1.5, delta=1e-5)
    strat, fold, got, ups, _, ref = _round("fp32", opts, dp_seed=11)
    _close(got, clipping.dp_mean(ups, ref, 1.0, 1.5, np.random.default_rng(11)))
    rec = fold.record()["robust"]
    assert rec["epsilon"] == pytest.approx(epsilon(1, 1.5, 1.0, 1e-5), rel=1e-3)
    report = strat.report()
    assert report["robust"] == "mean+clip:1+dp:1.5" and report["dp"]["rounds"] == 1
    resumed = FedAvg(options=FedAvgOptions(robust=opts))  # a restart recomposes the ledger
    resumed.load_state(strat.state())
    assert resumed.report()["dp"]["epsilon"] == report["dp"]["epsilon"]


def test_fedavg_aggregate_with_robust_equals_the_fold():
    from broker_server.strategies import Update

    strat, _, got, ups, samples, ref = _round("fp32", parse_rule("median"))
    again = strat.aggregate(1, ref, [Update(f"d{k}", 1, u, int(s))
                                     for k, (u, s) in enumerate(zip(ups, samples))])
    _close(again, got)


def test_robust_fold_refuses_a_non_finite_update_and_is_not_split():
    rng = np.random.default_rng(1)
    ref = _ref(rng)
    codec = codecs.get("fp32")
    fold = FedAvg(options=FedAvgOptions(robust=parse_rule("median"))).fold(
        1, ref, codec, CodecContext(1, 0, ref))
    bad = {k: v.copy() for k, v in ref.items()}
    bad["fc.bias"][0] = np.inf
    t, p = codec.encode(bad, CodecContext(1, 0, ref, "x"))
    with pytest.raises(WireError, match="non-finite"):
        fold.add("x", 5, t, p)
    assert not fold.kept
    assert FedAvg.split_options("fp32", FedAvgOptions(robust=parse_rule("median"))) is None
    assert FedAvg.split_options("fp32", FedAvgOptions()) == {}


def test_vote_cap_fold_equals_the_float_vote_with_capped_weights():
    """Past warm-up, one device with weight 10 against weights 1: capped at 0.15 its
    share falls to 0.15 and the fold decides as the float vote with those weights."""
    rng = np.random.default_rng(5)
    ref = _ref(rng)
    codec = codecs.get("sign")
    opts = SignSGDOptions("fv", server_lr=0.01, warmup_rounds=0, vote_cap=0.15)
    fast, slow = SignSGD(options=opts), SignSGD(options=opts)
    for s in (fast, slow):
        s.votes.record("d0", 1000, 1000)  # always agreed: the top weight
        for k in range(1, 8):
            s.votes.record(f"d{k}", 700, 1000)
    ctx = CodecContext(1, 0, ref)
    f_fast, f_slow = VoteFold(fast, 1, ref), DecodeAll(slow, 1, ref, codec, ctx)
    for k in range(8):
        w = {n: v + rng.normal(size=v.shape).astype(np.float32) for n, v in ref.items()}
        t, p = codec.encode(w, CodecContext(1, 0, ref, f"d{k}"))
        f_fast.add(f"d{k}", 10, t, p)
        f_slow.add(f"d{k}", 10, t, p)
    weights = [fast.votes.weight(f"d{k}") for k in range(8)]
    capped = cap_vote_weights(weights, 0.15)
    assert weights[0] / sum(weights) > 0.3 and capped[0] / sum(capped) <= 0.15 + 1e-9
    _close(f_fast.result(), f_slow.result())
    assert f_fast.q["d0"] == round(capped[0] * 256)
    assert fast.report() == {"vote_cap": 0.15}


def test_fedmrn_share_cap_folds_as_the_mean_with_capped_sample_weights():
    """One device claiming 1000 samples against 8 of 10: capped at 0.2 of the total it
    moves each weight by at most 0.2 x |noise|, and the fold equals the weighted mean of
    the decoded updates with the capped (whole-sample) weights."""
    from broker_server.robust.votes import cap_shares
    from broker_server.strategies.aggregate import weighted_average
    from device_runtime.codecs.fedmrn import noise

    rng = np.random.default_rng(2)
    ref = _ref(rng)
    codec, seed = codecs.get("fedmrn"), 5
    ctx = CodecContext(1, seed, ref)
    strat = FedAvg(options=FedAvgOptions(share_cap=0.2))
    fold = strat.fold(1, ref, codec, ctx)
    assert not fold.splittable
    decoded, counts = [], [1000] + [10] * 8
    for k, n in enumerate(counts):
        w = {name: (ref[name] + noise(name, v.shape, seed, codec.scale)
                    * rng.integers(0, 2, v.shape)).astype(np.float32) if v.ndim >= 2 else v
             for name, v in ref.items()}
        t, p = codec.encode(w, CodecContext(1, seed, ref, f"d{k}"))
        fold.add(f"d{k}", n, t, p)
        decoded.append(codec.decode(t, p, ctx))
    capped = cap_shares(np.array(counts, float), 0.2, steps=1)
    assert capped[0] / capped.sum() <= 0.2 and list(capped[1:]) == [10] * 8
    got = fold.result()
    _close(got, weighted_average(list(zip(decoded, capped))))
    uncapped = weighted_average(list(zip(decoded, map(float, counts))))
    assert not np.allclose(got["fc.weight"], uncapped["fc.weight"])
    assert FedAvg.split_options("fedmrn", FedAvgOptions(share_cap=0.2)) is None
