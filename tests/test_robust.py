"""broker_server.robust: each rule against a direct numpy reference, clipping, central
DP and its accountant, the options' one-line errors, and the 1-bit vote cap (the rules
judged by the aggregator's root data, zeno and fltrust: test_robust_root.py)."""
import subprocess
import sys

import numpy as np
import pytest

from broker_server.errors import RobustError
from broker_server.robust import accountant, clipping, rules, votes
from broker_server.robust.options import RobustOptions, aggregate, parse_rule
from broker_server.strategies.aggregate import weighted_average
from broker_server.strategies.voting import WEIGHT_STEPS, VotingWeights, others_vote, vote_sums
from tests.conftest import ROOT
from tests.test_device_runtime_no_torch import BLOCK_TORCH

SHAPES = {"w": (3, 4), "b": (5,)}


def updates(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
            for _ in range(n)]


def per_coordinate(ups: list[dict], fn) -> dict:
    """The reference: ``fn`` over the n values of each coordinate, one at a time."""
    out = {}
    for k, s in SHAPES.items():
        vals = np.stack([u[k].astype(np.float64) for u in ups]).reshape(len(ups), -1)
        out[k] = np.array([fn(list(vals[:, j])) for j in range(vals.shape[1])]).reshape(s)
    return out


def close(a: dict, b: dict, tol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(np.allclose(a[k], b[k], atol=tol) for k in a)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("n", [5, 6])
def test_median_matches_reference(n):
    ups = updates(n)
    ref = per_coordinate(ups, lambda v: (sorted(v)[(n - 1) // 2] + sorted(v)[n // 2]) / 2)
    assert close(rules.median(ups), ref)


@pytest.mark.parametrize("n,beta", [(10, 0.1), (10, 0.25), (7, 0.2), (5, 0.0)])
def test_trimmed_mean_matches_reference(n, beta):
    ups = updates(n, seed=n)
    k = int(np.floor(beta * n))
    ref = per_coordinate(ups, lambda v: float(np.mean(sorted(v)[k:n - k])))
    assert close(rules.trimmed_mean(ups, beta), ref)


def test_trimmed_mean_beta_out_of_range():
    for beta in (0.5, -0.1, 0.7):
        with pytest.raises(RobustError) as e:
            rules.trimmed_mean(updates(6), beta)
        assert "beta" in one_line(e) and str(beta) in str(e.value)


def krum_reference(ups: list[dict], f: int) -> list[float]:
    flat = [np.concatenate([u[k].astype(np.float64).ravel() for k in SHAPES]) for u in ups]
    scores = []
    for i, a in enumerate(flat):
        d = sorted(float(((a - b) ** 2).sum()) for j, b in enumerate(flat) if j != i)
        scores.append(sum(d[:len(ups) - f - 2]))
    return scores


def test_krum_and_multi_krum_match_reference():
    ups = updates(9, seed=3)
    ups[4] = {k: v + 5 for k, v in ups[4].items()}  # an outlier Krum must not pick
    scores = krum_reference(ups, f=2)
    best = int(np.argmin(scores))
    assert close(rules.krum(ups, 2), ups[best])
    order = list(np.argsort(scores, kind="stable")[:4])
    assert rules.krum_select(ups, 2, 4) == order and 4 not in order
    samples = [1.0 + i for i in range(9)]
    ref = weighted_average([(ups[i], samples[i]) for i in order])
    assert close(rules.multi_krum(ups, 2, 4, samples), ref, 1e-5)
    unweighted = {k: np.mean([ups[i][k] for i in order], axis=0) for k in SHAPES}
    assert close(rules.multi_krum(ups, 2, 4), unweighted, 1e-5)


def test_krum_needs_more_than_2f_plus_2():
    with pytest.raises(RobustError) as e:
        rules.krum(updates(6), 2)
    assert "n = 6" in one_line(e) and "f = 2" in str(e.value)
    rules.krum(updates(7), 2)  # 7 > 6: fine


def test_mismatched_layout_is_an_error():
    ups = updates(3)
    ups[1] = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(5, np.float32)}
    with pytest.raises(RobustError) as e:
        rules.median(ups)
    assert "update 1" in one_line(e)
    ups = updates(3)
    ups[2]["b"][0] = np.nan
    with pytest.raises(RobustError) as e:
        rules.krum(ups, 0)
    assert "update 2 has 1 non-finite" in one_line(e)


def test_fixed_clipping():
    ref = {k: np.ones(s, np.float32) for k, s in SHAPES.items()}
    ups = updates(6, seed=5)
    ups[0] = {k: v * 100 for k, v in ups[0].items()}
    x, _ = clipping.changes(ups, ref)
    norms = np.linalg.norm(x, axis=1)
    bound = float(np.sort(norms)[2])
    c = clipping.clip_updates(ups, ref, bound=bound)
    got = np.linalg.norm(c.changes, axis=1)
    assert np.all(got <= bound * (1 + 1e-12)) and c.clipped == int((norms > bound).sum())
    keep = norms <= bound
    assert np.allclose(c.changes[keep], x[keep])  # under the bound: untouched
    cos = (c.changes * x).sum(1) / (got * norms)
    assert np.allclose(cos, 1.0)  # clipping scales, never turns


def test_adaptive_clipping_uses_the_quantile_of_norms():
    ref = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
    ups = updates(11, seed=6)
    norms = np.linalg.norm(clipping.changes(ups, ref)[0], axis=1)
    c = clipping.clip_updates(ups, ref, quantile=0.5)
    assert c.bound == pytest.approx(float(np.median(norms))) and c.clipped == 5


def test_dp_sum_adds_gaussian_noise_of_multiplier_times_bound():
    x = np.random.default_rng(0).normal(size=(5, 20000))
    clipped, _, _ = clipping.clip_rows(x, 2.0)
    got = clipping.dp_sum(clipped, 2.0, 1.5, np.random.default_rng(7))
    expect = clipped.sum(0) + np.random.default_rng(7).normal(0, 3.0, size=20000)
    assert np.allclose(got, expect)
    assert np.std(got - clipped.sum(0)) == pytest.approx(3.0, rel=0.03)
    with pytest.raises(RobustError) as e:
        clipping.dp_sum(x, 2.0, 1.5, np.random.default_rng(0))  # not clipped
    assert "clip before" in one_line(e)


def test_accountant_matches_the_library_and_behaves():
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant

    acc = rdp_privacy_accountant.RdpAccountant(list(accountant.ORDERS))
    acc.compose(dp_event.PoissonSampledDpEvent(0.2, dp_event.GaussianDpEvent(1.1)), 30)
    eps = accountant.epsilon(30, 1.1, 0.2, 1e-5)
    assert eps == pytest.approx(acc.get_epsilon(1e-5))
    per_round = accountant.epsilons(30, 1.1, 0.2, 1e-5)
    assert per_round[-1] == pytest.approx(eps) and per_round == sorted(per_round)
    assert eps < accountant.epsilon(30, 1.1, 1.0, 1e-5) < accountant.epsilon(30, 0.8, 1.0, 1e-5)
    assert accountant.epsilon(0, 1.1, 0.2, 1e-5) == 0.0
    z = accountant.noise_multiplier(4.0, 30, 1.0, 1e-5)
    assert accountant.epsilon(30, z, 1.0, 1e-5) == pytest.approx(4.0, rel=0.01)
    with pytest.raises(RobustError) as e:
        accountant.epsilon(10, 1.0, 1.5, 1e-5)
    assert "sampling rate" in one_line(e)


def test_parse_rule():
    assert parse_rule("median") == RobustOptions(rule="median")
    assert parse_rule("trimmed:0.2").beta == 0.2
    assert parse_rule("krum:2") == RobustOptions(rule="krum", f=2)
    assert parse_rule("multikrum:2:5", clip=1.0) == RobustOptions("multikrum", f=2, m=5, clip=1.0)
    for bad, words in (("bulyan", "valid: mean, median, trimmed, krum, multikrum"),
                       ("krum:x", "not a number"), ("median:3", "at most 0")):
        with pytest.raises(RobustError) as e:
            parse_rule(bad)
        assert words in one_line(e)


@pytest.mark.parametrize("opts,devices,words", [
    (RobustOptions("krum", f=3), 8, "n = 8"),
    (RobustOptions("multikrum", f=1, m=9), 8, "m must be"),
    (RobustOptions("trimmed", beta=0.6), 10, "beta"),
    (RobustOptions(dp_noise=1.0), 10, "without clipping"),
    (RobustOptions(dp_noise=1.0, clip_quantile=0.5), 10, "not private"),
    (RobustOptions("median", dp_noise=1.0, clip=1.0), 10, "rule mean"),
    (RobustOptions(clip=1.0, clip_quantile=0.5), 10, "not both"),
    (RobustOptions("nope"), 10, "valid: mean"),
])
def test_inconsistent_options_are_one_line_errors(opts, devices, words):
    with pytest.raises(RobustError) as e:
        opts.check(devices)
    assert words in one_line(e)


def test_aggregate_pipeline():
    ref = {k: np.full(s, 0.5, np.float32) for k, s in SHAPES.items()}
    ups, samples = updates(8, seed=9), [float(i + 1) for i in range(8)]
    out, info = aggregate(RobustOptions(), ups, ref, samples)
    assert close(out, weighted_average(list(zip(ups, samples))), 1e-5) and info.rule == "mean"
    out, info = aggregate(parse_rule("median", clip_quantile=0.5), ups, ref)
    c = clipping.clip_updates(ups, ref, quantile=0.5)
    assert close(out, clipping.apply(ref, np.median(c.changes, axis=0), c.shapes), 1e-6)
    assert info.rule == "median+clip:q0.5" and info.clipped == 4
    _, info = aggregate(parse_rule("multikrum:1:3"), ups, ref)
    assert list(info.chosen) == rules.krum_select(ups, 1, 3) and info.rule == "multikrum:1:3"
    _, info = aggregate(parse_rule("multikrum:2"), ups, ref)
    assert len(info.chosen) == 6 and info.rule == "multikrum:2"
    opts = RobustOptions(clip=1.0, dp_noise=0.5)
    a, _ = aggregate(opts, ups, ref, rng=np.random.default_rng(1))
    b = clipping.dp_mean(ups, ref, 1.0, 0.5, np.random.default_rng(1))
    assert close(a, b, 1e-6)


def test_vote_cap_bounds_a_reliable_looking_attacker():
    vw = VotingWeights()
    for _ in range(50):  # the attacker agrees with the vote every round: p -> 0
        vw.record("attacker", 1.0, 1)
        for i in range(19):
            vw.record(f"h{i}", 0.7, 1)
    ws = [vw.weight("attacker")] + [vw.weight(f"h{i}") for i in range(19)]
    assert ws[0] / sum(ws) > 0.3  # uncapped: a third of the vote
    capped = votes.cap_vote_weights(ws, 0.1)
    assert 0.099 < capped[0] / sum(capped) <= 0.1 and capped[1:] == ws[1:]
    assert votes.VOTE_STEPS == WEIGHT_STEPS and capped[0] * WEIGHT_STEPS % 1 == 0
    exact = votes.cap_shares(np.array(ws), 0.1)
    assert exact[0] / exact.sum() == pytest.approx(0.1)
    per_coord = [{"w": np.array([w, 1.0])} for w in ws]
    got = votes.cap_vote_weights(per_coord, 0.1)
    total = sum(g["w"] for g in got)
    assert 0.099 < got[0]["w"][0] / total[0] <= 0.1 and got[0]["w"][1] == 1.0


def test_cap_shares_matches_a_direct_search():
    """Per column: the level t solving t = cap x sum(min(|w|, t)), found by bisection."""
    rng = np.random.default_rng(4)
    w = rng.normal(size=(7, 50)) * rng.choice([1, 10], size=(7, 1))
    got = votes.cap_shares(w, 0.2)
    for j in range(50):
        a, lo, hi = np.abs(w[:, j]), 0.0, np.abs(w[:, j]).max()
        for _ in range(100):
            t = (lo + hi) / 2
            lo, hi = (t, hi) if t < 0.2 * np.minimum(a, t).sum() else (lo, t)
        assert np.allclose(got[:, j], np.sign(w[:, j]) * np.minimum(a, hi), atol=1e-9)
    assert (np.abs(got) / np.abs(got).sum(0)).max() <= 0.2 + 1e-12
    with pytest.raises(RobustError) as e:
        votes.cap_shares(np.ones(5), 0.1)
    assert "1/5" in one_line(e)


def test_one_voter_flips_only_where_the_others_are_split():
    rng = np.random.default_rng(0)
    others = rng.choice([-1, 1], size=(19, 5000))
    weights = np.ones(20)
    weights[0] = 3.0  # the attacker's share: 3 / 22
    share = 3.0 / 22
    honest = np.sign(others.sum(0))
    attacked = np.sign(-3.0 * honest + others.sum(0))  # it votes against the others
    flipped = attacked != honest
    margin = np.abs(others.sum(0)) / 19
    bound = votes.flip_margin(share)
    assert flipped.any() and np.all(margin[flipped] <= bound + 1e-12)  # at equality: a tie
    assert np.all(flipped[margin < bound])  # and below it, it always decides


def test_mask_fold_bound_holds_for_any_mask():
    rng = np.random.default_rng(2)
    noise = rng.uniform(-0.05, 0.05, size=1000)
    masks, n = rng.integers(0, 2, size=(10, 1000)), rng.integers(10, 100, size=10)
    for signed in (False, True):
        m = 2 * masks - 1 if signed else masks
        fold = noise * (n @ m) / n.sum()
        worst = m.copy()
        worst[0] = (1 - masks[0]) if not signed else -m[0]  # every bit it sends flipped
        moved = np.abs(noise * (n @ worst) / n.sum() - fold)
        bound = votes.mask_fold_bound(noise, n[0] / n.sum(), signed)
        assert np.all(moved <= bound + 1e-12) and np.allclose(moved.max(), bound.max(), rtol=0.1)


def test_robust_runs_without_torch():
    code = BLOCK_TORCH + """
import numpy as np
from broker_server.robust import accountant, aggregate, parse_rule
ups = [{"w": np.full(4, float(i), np.float32)} for i in range(5)]
out, _ = aggregate(parse_rule("trimmed:0.2"), ups, {"w": np.zeros(4, np.float32)})
assert np.allclose(out["w"], 2.0)
assert accountant.epsilon(5, 1.0, 1.0, 1e-5) > 0
assert "torch" not in sys.modules
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr


def test_federated_voting_turns_sign_flippers_into_honest_voters():
    """votes' claim: FV gives an always-disagreeing device a negative weight, so its
    inverted vote counts as an honest one (signsgd.SignSGD's loop: weights from the
    counters, agreement with the leave-one-out vote)."""
    rng, vw = np.random.default_rng(8), VotingWeights()
    names = [f"bad{i}" for i in range(3)] + [f"h{i}" for i in range(10)]
    for _ in range(8):
        truth = rng.choice([-1, 1], size=2000).astype(np.int8)
        noisy = [np.where(rng.random(2000) < 0.3, -truth, truth).astype(np.int8)
                 for _ in names]
        signs = [{"w": -s if n.startswith("bad") else s} for n, s in zip(names, noisy)]
        weights = [vw.weight(n) for n in names]
        sums = vote_sums(signs, weights)
        for n, s, w in zip(names, signs, weights):
            vw.update(n, s, others_vote(sums, s, w))
    assert all(vw.weight(f"bad{i}") < 0 for i in range(3))
    fv = np.sign(vote_sums(signs, [vw.weight(n) for n in names])["w"])
    mv = np.sign(vote_sums(signs, [1.0] * len(names))["w"])
    honest_only = np.sign(sum(s["w"].astype(float) for s in signs[3:]))
    assert (fv != truth).mean() < (honest_only != truth).mean() < (mv != truth).mean()
