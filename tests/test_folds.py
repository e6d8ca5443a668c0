"""Folding updates as they arrive gives the same aggregate as the reference maths.

The bit-sliced paths (FedMRN masks summed as integers, sign votes counted from
the packed bits) must decide exactly as decoding every update and calling the
pure numpy functions; a corrupt payload must leave a fold unchanged.
"""
import numpy as np
import pytest

from broker_server.strategies import FedAvg, SignSGD, SignSGDOptions
from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.bitsum import BitSum
from broker_server.strategies.folds import DecodeAll, FedMRNMean, MeanFold
from broker_server.strategies.vote_fold import VoteFold
from device_runtime import codecs
from device_runtime.codecs import CodecContext
from device_runtime.codecs.fedmrn import noise
from device_runtime.errors import WireError


def _ref(rng):
    return {"conv.weight": rng.normal(size=(8, 3, 5)).astype(np.float32),
            "bn.weight": rng.normal(size=8).astype(np.float32),
            "bn.running_var": rng.uniform(0.5, 2, 8).astype(np.float32),
            "fc.weight": rng.normal(size=(10, 13)).astype(np.float32),  # 130 bits: padding
            "fc.bias": rng.normal(size=10).astype(np.float32)}


# 140,001 bits span two of counts()' chunks and end mid-byte; weights near 2**33 make
# the sums int64.
@pytest.mark.parametrize("nbits,max_weight", [(1, 5000), (9, 5000), (64, 5000), (1000, 5000),
                                              (4099, 5000), (140_001, 5000), (777, 2**33)])
def test_bitsum_counts_weighted_bits_exactly(nbits, max_weight):
    rng = np.random.default_rng(nbits)
    n = 70
    bits = rng.integers(0, 2, size=(n, nbits)).astype(bool)
    w = rng.integers(0, max_weight, size=n)
    inv = rng.integers(0, 2, size=n).astype(bool)
    whole, a, b = BitSum((nbits + 7) // 8, group=16, block=8), BitSum((nbits + 7) // 8), \
        BitSum((nbits + 7) // 8, group=4)
    for k in range(n):
        packed = np.packbits(bits[k], bitorder="little")
        whole.add(packed, int(w[k]), invert=bool(inv[k]))
        (a if k % 3 else b).add(packed, int(w[k]), invert=bool(inv[k]))
    expected = (np.where(inv[:, None], ~bits, bits) * w[:, None]).sum(0)
    np.testing.assert_array_equal(whole.counts(nbits), expected)
    a.merge(b)  # workers' partial sums merge to the same counts
    np.testing.assert_array_equal(a.counts(nbits), expected)
    assert a.total_weight == whole.total_weight == int(w.sum())


def test_bitsum_small_rounds_in_lanes_merge_and_count_exactly():
    # A few updates of a small vector go to 16-bit lanes; a worker's partial travels as
    # planes, so the lanes must move into them exactly, and a weight that would
    # overflow a lane goes to the planes.
    rng = np.random.default_rng(5)
    nbits = 1003
    bits = rng.integers(0, 2, size=(6, nbits)).astype(bool)
    w = [3, 0, 65534, 7, 1, 200]
    a, b = BitSum((nbits + 7) // 8), BitSum((nbits + 7) // 8)
    for k in range(6):
        (a if k < 3 else b).add(np.packbits(bits[k], bitorder="little"), w[k], invert=k == 4)
    assert a.planes and b.lanes is not None and not b.planes  # 65534 left the lanes
    each = np.where(np.arange(6)[:, None] == 4, ~bits, bits) * np.array(w)[:, None]
    expected = each.sum(0)
    np.testing.assert_array_equal(b.counts(nbits), each[3:].sum(0))
    a.merge(b)
    np.testing.assert_array_equal(a.counts(nbits), expected)


@pytest.mark.parametrize("codec_name", ["fedmrn", "fedmrn-signed"])
def test_fedmrn_bit_fold_equals_decoded_fedavg(codec_name):
    rng = np.random.default_rng(1)
    ref = _ref(rng)
    codec, seed = codecs.get(codec_name), 11
    ctx = CodecContext(3, seed, ref)
    fold, decoded = FedMRNMean(codec, ctx), []
    for k in range(9):
        low = -1 if codec.signed else 0
        w = {n: (ref[n] + noise(n, v.shape, seed, codec.scale) *
                 rng.integers(low, 2, v.shape)).astype(np.float32)
             if v.ndim >= 2 else v + rng.normal(size=v.shape).astype(np.float32)
             for n, v in ref.items()}
        if codec.signed:  # signed masks are +-1 only
            w = {n: (ref[n] + noise(n, v.shape, seed, codec.scale) *
                     rng.choice([-1, 1], v.shape)).astype(np.float32) if v.ndim >= 2 else w[n]
                 for n, v in ref.items()}
        t, p = codec.encode(w, CodecContext(3, seed, ref, f"d{k}"))
        fold.add(f"d{k}", 10 + 37 * k, t, p)
        decoded.append((codec.decode(t, p, ctx), 10 + 37 * k))
    got, want = fold.result(), weighted_average(decoded)
    for n in ref:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_fedmrn_fold_rejects_corrupt_payload_and_stays_unchanged():
    rng = np.random.default_rng(2)
    ref = _ref(rng)
    codec = codecs.get("fedmrn")
    ctx = CodecContext(1, 5, ref)
    fold = FedMRNMean(codec, ctx)
    t, p = codec.encode(ref, CodecContext(1, 5, ref, "a"))
    fold.add("a", 10, t, p)
    before = fold.result()
    bad = dict(t, mask=t["mask"].copy())
    bad["mask"][-1] = 0xFF  # padding bits set
    with pytest.raises(WireError, match="padding"):
        fold.add("b", 10, bad, p)
    with pytest.raises(WireError, match="seed"):
        fold.add("b", 10, t, {"mask": dict(p["mask"], seed=6)})
    nan = dict(t, dense=t["dense"].copy())
    nan["dense"][0] = np.nan
    with pytest.raises(WireError, match="finite"):
        fold.add("b", 10, nan, p)

    after = fold.result()
    assert fold.bits.total_weight == 10
    for n in ref:
        np.testing.assert_array_equal(before[n], after[n])


@pytest.mark.parametrize("decoder,estimate,reference", [
    ("mv", "vote", "others"), ("fv", "vote", "others"), ("fv", "pairs", "others"),
    ("fv", "vote", "all")])
def test_vote_fold_decides_exactly_as_the_float_vote(decoder, estimate, reference):
    rng = np.random.default_rng(3)
    ref = _ref(rng)
    codec = codecs.get("sign")
    opts = SignSGDOptions(decoder, server_lr=0.01, warmup_rounds=1, gamma=0.9,
                          estimate=estimate, server_lr_half_life=2, reference=reference)
    fast, slow = SignSGD(options=opts), SignSGD(options=opts)
    weights_fast = weights_slow = ref
    for r in range(1, 5):
        ctx = CodecContext(r, 0, weights_fast)
        f_fast, f_slow = VoteFold(fast, r, weights_fast), DecodeAll(slow, r, weights_slow, codec,
                                                                   ctx)
        assert isinstance(fast.fold(r, weights_fast, codec, ctx), VoteFold)
        for k in range(7):
            noisy = k >= 4  # some devices mostly disagree, so FV weights go negative
            w = {n: v + rng.normal(size=v.shape).astype(np.float32) * (1 if noisy else 0.1)
                 + (0.5 if not noisy else -0.5) for n, v in weights_fast.items()}
            t, p = codec.encode(w, CodecContext(r, 0, weights_fast, f"d{k}"))
            f_fast.add(f"d{k}", 10, t, p)
            f_slow.add(f"d{k}", 10, t, p)
        weights_fast, weights_slow = f_fast.result(), f_slow.result()
        for n in ref:
            np.testing.assert_array_equal(weights_fast[n], weights_slow[n])
    for key in ("total", "agree"):
        got, want = fast.votes.to_json()[key], slow.votes.to_json()[key]
        assert got.keys() == want.keys()
        assert all(got[d] == pytest.approx(want[d]) for d in got)
    if decoder == "fv":  # the noisy devices ended with weights that vote against them
        assert fast.votes.weight("d6") < 0 < fast.votes.weight("d0")


def test_vote_fold_rejects_a_bad_shape_param():
    rng = np.random.default_rng(4)
    ref = _ref(rng)
    codec, strat = codecs.get("sign"), SignSGD()
    fold = VoteFold(strat, 1, ref)
    t, p = codec.encode(ref, CodecContext(1, 0, ref, "a"))
    p = dict(p, **{"fc.weight": dict(p["fc.weight"], shape=[13, 10])})
    with pytest.raises(WireError, match="fc.weight"):
        fold.add("a", 1, t, p)
    assert not fold.q and fold.bits.total_weight == 0


def test_fedavg_uses_the_bit_fold_for_fedmrn_and_float_sums_otherwise():
    ref = _ref(np.random.default_rng(5))
    fedavg = FedAvg()
    assert isinstance(fedavg.fold(1, ref, codecs.get("fedmrn"), CodecContext(1, 0, ref)),
                      FedMRNMean)
    assert isinstance(fedavg.fold(1, ref, codecs.get("int8"), CodecContext(1, 0, ref)), MeanFold)


def test_sign_codec_sends_running_statistics_as_float16_and_the_vote_averages_them():
    rng = np.random.default_rng(6)
    ref = _ref(rng)
    codec, strat = codecs.get("sign"), SignSGD(options=SignSGDOptions("mv", server_lr=0.01))
    fold = VoteFold(strat, 1, ref)
    variances = []
    for k in range(3):
        w = {n: v + 0.1 for n, v in ref.items()}
        w["bn.running_var"] = np.full(8, 1.0 + k, np.float32)
        t, p = codec.encode(w, CodecContext(1, 0, ref, f"d{k}"))
        assert t["bn.running_var"].dtype == np.float16 and t["fc.weight"].dtype == np.uint8
        fold.add(f"d{k}", 10 * (k + 1), t, p)
        variances.append((w["bn.running_var"], 10 * (k + 1)))
    out = fold.result()
    np.testing.assert_allclose(out["bn.running_var"], (1 * 10 + 2 * 20 + 3 * 30) / 60, rtol=1e-3)
    np.testing.assert_allclose(out["fc.weight"], ref["fc.weight"] + 0.01, rtol=1e-6)
    t, p = codec.encode({n: v + 0.1 for n, v in ref.items()}, CodecContext(1, 0, ref, "bad"))
    t["bn.running_var"] = t["bn.running_var"].copy()
    t["bn.running_var"][2] = np.inf
    with pytest.raises(WireError, match="bn.running_var.*finite"):
        fold.add("bad", 10, t, p)
    with pytest.raises(WireError, match="finite"):
        codec.decode(t, p, CodecContext(1, 0, ref))


def test_vote_fold_estimates_agreement_from_a_sample_of_coordinates():
    # A large model: p_m is measured on agreement_sample coordinates, and lands
    # within a few standard errors of the exact leave-one-out fraction.
    rng = np.random.default_rng(5)
    ref = {"w": np.zeros((300, 1000), np.float32)}
    truth = rng.normal(size=ref["w"].shape)
    codec = codecs.get("sign")
    exact = SignSGD(options=SignSGDOptions("fv", agreement_sample=10**6, warmup_rounds=9))
    sampled = SignSGD(options=SignSGDOptions("fv", agreement_sample=20000, warmup_rounds=9))
    folds = [VoteFold(s, 1, ref) for s in (exact, sampled)]
    assert folds[1].where.size == 20000 and folds[0].where.size == truth.size
    for k in range(5):  # device k flips a growing share of the true signs
        flip = rng.random(truth.shape) < 0.1 * k
        t, p = codec.encode({"w": np.where(flip, -truth, truth).astype(np.float32)},
                            CodecContext(1, 0, ref, f"d{k}"))
        for f in folds:
            f.add(f"d{k}", 10, t, p)
    for f in folds:
        f.result()
    for k in range(5):
        a, b = exact.votes.agree[f"d{k}"], sampled.votes.agree[f"d{k}"]
        assert abs(a - b) < 4 * np.sqrt(a * (1 - a) / 20000) + 1e-9
    assert exact.votes.agree["d0"] > exact.votes.agree["d4"] + 0.15


def test_signsgd_server_step_halves_every_half_life():
    # Without a schedule a sign step moves every coordinate by the full server lr to
    # the end of training; with one, round r steps lr * 0.5 ** ((r - 1) / half_life).
    rng = np.random.default_rng(6)
    ref = {"w": rng.normal(size=(20, 30)).astype(np.float32)}
    codec = codecs.get("sign")
    strat = SignSGD(options=SignSGDOptions("mv", server_lr=0.01, server_lr_half_life=2))
    assert [strat.server_lr(r) for r in (1, 3, 5)] == pytest.approx([0.01, 0.005, 0.0025])
    fold = VoteFold(strat, 5, ref)
    t, p = codec.encode({"w": ref["w"] + 1}, CodecContext(5, 0, ref, "a"))
    fold.add("a", 10, t, p)
    np.testing.assert_allclose(fold.result()["w"] - ref["w"], 0.0025, rtol=1e-3)
    with pytest.raises(ValueError, match="server_lr_half_life"):
        SignSGD(options=SignSGDOptions("fv", server_lr_half_life=-1))


def test_signsgd_rejects_a_nonpositive_agreement_sample():
    with pytest.raises(ValueError, match="agreement_sample"):
        SignSGD(options=SignSGDOptions("fv", agreement_sample=0))
