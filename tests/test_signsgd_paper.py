"""signSGD-FV's paper mode (``SignSGDOptions.paper()``, ``--paper``): the counters and
reference vote of the authors' code as numpy maths, the options it builds, the flags
laid over it, and the scale-out shortcut it must not take."""
from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from broker_server.strategies import SignSGD, SignSGDOptions
from broker_server.strategies.base import Update
from broker_server.strategies.voting import (VotingWeights, agreement_references,
                                             reliability_weight, sampled_agreement, vote_sums)


def _signs(rng, devices: int, n: int) -> list[dict[str, np.ndarray]]:
    return [{"w": np.where(rng.random(n) < 0.5, 1, -1).astype(np.int8)} for _ in range(devices)]


# -- the maths ---------------------------------------------------------------------------

def test_full_vote_and_leave_one_out_differ_on_a_device_that_decides_the_vote():
    # A (+1, weight 3) outvotes B and C (-1, weight 1 each): the full vote is +1, which
    # A agrees with because it cast it; without A, the others' vote is -1.
    signs = [{"w": np.array([1], np.int8)}, {"w": np.array([-1], np.int8)},
             {"w": np.array([-1], np.int8)}]
    weights = [3.0, 1.0, 1.0]
    sums = vote_sums(signs, weights)
    full = agreement_references(signs, sums, weights, False, "all")
    loo = agreement_references(signs, sums, weights, False, "others")
    assert [int(r["w"][0]) for r in full] == [1, 1, 1]
    assert [int(r["w"][0]) for r in loo] == [-1, 1, 1]  # A: -2; B, C: 3 - 1 = +2
    agree_full = [bool(s["w"][0] == r["w"][0]) for s, r in zip(signs, full)]
    agree_loo = [bool(s["w"][0] == r["w"][0]) for s, r in zip(signs, loo)]
    assert agree_full == [True, False, False] and agree_loo == [False, False, False]
    # per coordinate, fedge's leave-one-out reference is the others' unweighted majority
    plain = agreement_references(signs, sums, weights, True, "others")
    assert [int(r["w"][0]) for r in plain] == [-1, 0, 0]  # B, C: a tie, no evidence


def test_with_gamma_1_per_coordinate_counters_are_cumulative_agreement_counts():
    rng = np.random.default_rng(0)
    counters = VotingWeights(per_coordinate=True, gamma=1.0, prior=0.0)
    agree, decided = np.zeros((4, 50)), np.zeros((4, 50))
    for _ in range(30):
        signs = _signs(rng, 4, 50)  # 4 devices: the full vote ties often
        sums = vote_sums(signs, [1.0] * 4)
        for k, (s, ref) in enumerate(zip(signs, agreement_references(signs, sums, [1.0] * 4,
                                                                      True, "all"))):
            counters.update(f"d{k}", s, ref)
            agree[k] += s["w"] == ref["w"]
            decided[k] += ref["w"] != 0
    for k in range(4):
        np.testing.assert_array_equal(counters.agree[f"d{k}"]["w"], agree[k])
        np.testing.assert_array_equal(counters.total[f"d{k}"]["w"], decided[k])


def test_without_a_prior_the_weight_is_the_authors_log_likelihood_ratio():
    # the authors' calc_weight: p_right = agree / total, w = ln(p_right / (1 - p_right))
    # clipped to +-10; fedge's weights are kept to 1/256 steps (voting.WEIGHT_STEPS)
    agree, total = np.array([0.0, 3, 50, 97, 100, 60]), np.array([100.0, 100, 100, 100, 100, 70])
    p = agree / total
    want = np.clip(np.log((p + 1e-5) / (1 - p + 1e-5)), -10, 10)
    np.testing.assert_allclose(reliability_weight(agree, total, 0.0), want, atol=1 / 512)
    # fedge's Laplace prior pulls a short, perfect history well short of the clip
    assert reliability_weight(5.0, 5.0, 1.0) == pytest.approx(np.log(6), abs=1 / 512)
    assert reliability_weight(5.0, 5.0, 0.0) == 10.0


@pytest.mark.parametrize("reference", ["others", "all"])
def test_sampled_agreement_counts_as_the_votes_built_one_by_one(reference):
    rng = np.random.default_rng(1)
    s = np.where(rng.random((6, 400)) < 0.5, 1, -1).astype(np.int8)
    q = np.array([256, 256, 512, -256, 128, 0], np.int32)  # ties happen at these weights
    same, decided = sampled_agreement(s, q, reference)
    signs = [{"w": row} for row in s]
    sums = vote_sums(signs, [float(x) for x in q])
    refs = agreement_references(signs, sums, [float(x) for x in q], False, reference)
    assert list(same) == [int((row == r["w"]).sum()) for row, r in zip(s, refs)]
    assert list(decided) == [int(np.count_nonzero(r["w"])) for r in refs]


# -- the options -------------------------------------------------------------------------

def test_paper_options_are_the_authors_and_the_defaults_stay_fedges():
    paper, ours = SignSGDOptions.paper(), SignSGDOptions()
    assert (paper.decoder, paper.per_coordinate, paper.gamma, paper.reference,
            paper.warmup_rounds, paper.coordinate_prior) == ("fv", True, 1.0, "all", 100, 0.0)
    assert (ours.decoder, ours.per_coordinate, ours.gamma, ours.reference, ours.warmup_rounds,
            ours.agreement_sample, ours.coordinate_prior) == ("fv", False, 0.99, "others", 5,
                                                              2048, 1.0)
    strat = SignSGD(options=paper)
    assert not strat.weighted(100) and strat.weighted(101)  # 100 rounds of plain vote
    assert strat.votes.per_coordinate and strat.votes.gamma == 1.0 and strat.votes.prior == 0


@pytest.mark.parametrize("field,value,message", [
    ("reference", "mine", "reference: expected others or all, got 'mine'"),
    ("gamma", 0.0, "gamma: expected a discount in (0, 1], got 0.0"),
    ("gamma", 1.5, "gamma: expected a discount in (0, 1], got 1.5"),
    ("warmup_rounds", -1, "warmup_rounds: expected >= 0 rounds, got -1"),
    ("coordinate_prior", -1.0, "coordinate_prior: expected >= 0, got -1.0"),
])
def test_signsgd_refuses_a_bad_paper_option(field, value, message):
    with pytest.raises(ValueError) as e:
        SignSGD(options=dataclasses.replace(SignSGDOptions(), **{field: value}))
    assert str(e.value) == message


def test_paper_mode_counts_every_coordinate_against_the_decoded_vote():
    # the rule end to end: after the rounds, each device's counters are its cumulative
    # agreement with the sign the server stepped along, coordinate by coordinate
    rng = np.random.default_rng(2)
    strat = SignSGD(options=dataclasses.replace(SignSGDOptions.paper(), warmup_rounds=2))
    w = {"w": np.zeros(40, np.float32)}
    agree, total = np.zeros((5, 40)), np.zeros((5, 40))
    for r in range(1, 6):
        signs = _signs(rng, 5, 40)
        ups = [Update(f"d{k}", r, {"w": w["w"] + s["w"] * np.float32(0.1)}, 10)
               for k, s in enumerate(signs)]
        new = strat.aggregate(r, w, ups)
        decoded = np.sign(new["w"] - w["w"])
        for k, s in enumerate(signs):
            agree[k] += s["w"] == decoded
            total[k] += decoded != 0
        w = new
    for k in range(5):
        np.testing.assert_array_equal(strat.votes.agree[f"d{k}"]["w"], agree[k])
        np.testing.assert_array_equal(strat.votes.total[f"d{k}"]["w"], total[k])


# -- the flags ---------------------------------------------------------------------------

def _options(*flags: str, devices: int = 4):
    from toolkit.cli import strategy_args
    from toolkit.planning.profiles import ProfileCatalogue

    p = argparse.ArgumentParser()
    strategy_args.name_args(p)
    strategy_args.add(p)
    args = p.parse_args(list(flags))
    return strategy_args.options(args, ProfileCatalogue.load(), ["rpi4"], devices)


def test_paper_flag_builds_the_paper_options_and_explicit_flags_win():
    paper = _options("--strategy", "signsgd", "--paper")
    assert dataclasses.replace(paper, batch_by_profile={}) == SignSGDOptions.paper()
    ours = _options("--strategy", "signsgd")
    assert dataclasses.replace(ours, batch_by_profile={}) == SignSGDOptions()
    mixed = _options("--strategy", "signsgd", "--paper", "--sign-warmup", "3",
                     "--sign-gamma", "0.9", "--sign-reference", "others",
                     "--no-sign-per-coordinate", "--server-lr", "0.01")
    assert (mixed.warmup_rounds, mixed.gamma, mixed.reference, mixed.per_coordinate,
            mixed.server_lr) == (3, 0.9, "others", False, 0.01)
    assert mixed.coordinate_prior == 0.0 and mixed.decoder == "fv"  # the rest: the paper's
    plain = _options("--strategy", "signsgd", "--sign-warmup", "0", "--sign-per-coordinate")
    assert (plain.warmup_rounds, plain.per_coordinate, plain.gamma) == (0, True, 0.99)


@pytest.mark.parametrize("flags,message", [
    (["--sign-gamma", "0"], "--sign-gamma: expected a discount in (0, 1], got 0.0"),
    (["--sign-gamma", "1.01"], "--sign-gamma: expected a discount in (0, 1], got 1.01"),
    (["--sign-warmup", "-2"], "--sign-warmup: expected >= 0 rounds, got -2"),
    (["--paper", "--sign-estimate", "pairs"],
     "--sign-estimate pairs: estimates one weight per device; --paper counts per "
     "coordinate; add --no-sign-per-coordinate"),
])
def test_bad_sign_flags_are_a_usage_error_naming_the_flag(flags, message):
    from toolkit.errors import UsageError

    with pytest.raises(UsageError) as e:
        _options("--strategy", "signsgd", *flags)
    assert str(e.value) == message


def test_paper_pairs_per_device_is_allowed():
    opts = _options("--strategy", "signsgd", "--paper", "--sign-estimate", "pairs",
                    "--no-sign-per-coordinate")
    assert opts.estimate == "pairs" and not opts.per_coordinate


def test_paper_with_a_strategy_without_a_paper_mode_is_one_line(tmp_path, capsys):
    from device_runtime.errors import EXIT_USAGE
    from toolkit.cli.main import main

    code = main(["simulate", "--strategy", "fedavg", "--paper", "--devices", "4",
                 "--rounds", "1", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE and "\n" not in err
    assert ("--paper: strategy fedavg has no paper mode (these do: ecofed, reft, signsgd, "
            "splitmix)") in err
    assert not (tmp_path / "r.json").exists()


# -- scale-out ---------------------------------------------------------------------------

def test_only_a_majority_vote_splits_over_workers_in_paper_mode_too():
    from broker_server.strategies.vote_fold import VoteFold
    from device_runtime import codecs
    from device_runtime.codecs import CodecContext

    paper = SignSGDOptions.paper()
    assert SignSGD.split_options("sign", paper) is None  # FV: weights need every update
    assert SignSGD.split_options("sign", dataclasses.replace(paper, reference="others")) is None
    mv = dataclasses.replace(paper, decoder="mv")  # the paper's baseline: counters unread
    assert SignSGD.split_options("sign", mv) == {"decoder": "mv"}
    assert SignSGD.split_options("fp32", mv) is None
    worker = SignSGD.for_worker({"decoder": "mv"})
    assert worker.opts.decoder == "mv"
    ref = {"w": np.zeros(64, np.float32)}
    fold = SignSGD(options=mv).fold(1, ref, codecs.get("sign"), CodecContext(1, 0, ref))
    assert isinstance(fold, VoteFold) and fold.splittable
    fv = SignSGD(options=paper).fold(1, ref, codecs.get("sign"), CodecContext(1, 0, ref))
    assert not isinstance(fv, VoteFold) and not fv.splittable  # per coordinate: unpacked


def test_a_per_coordinate_majority_vote_decides_as_before():
    # MV now folds from the bits whatever per_coordinate says: the same step as the
    # float vote over the decoded signs (which it took before)
    from broker_server.strategies.folds import DecodeAll
    from device_runtime import codecs
    from device_runtime.codecs import CodecContext

    rng, codec = np.random.default_rng(5), codecs.get("sign")
    mv = SignSGDOptions("mv", per_coordinate=True, server_lr=0.01)
    ref = {"w": rng.normal(size=(8, 9)).astype(np.float32)}
    fast = SignSGD(options=mv).fold(1, ref, codec, CodecContext(1, 0, ref))
    slow = DecodeAll(SignSGD(options=mv), 1, ref, codec, CodecContext(1, 0, ref))
    for k in range(6):
        w = {"w": ref["w"] + rng.normal(size=(8, 9)).astype(np.float32)}
        t, p = codec.encode(w, CodecContext(1, 0, ref, f"d{k}"))
        fast.add(f"d{k}", 10, t, p)
        slow.add(f"d{k}", 10, t, p)
    np.testing.assert_array_equal(fast.result()["w"], slow.result()["w"])
