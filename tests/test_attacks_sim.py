"""Attacks in real ``fedge simulate`` runs (MNIST-1D, the aggregator's norm guard off
so that the rule is what is measured): each attack goes through the codec and the
fold like an honest update, and is contained by the rule meant for it."""
import pytest

from broker_server.robust import parse_rule
from broker_server.strategies import FedAvgOptions
from toolkit.errors import UsageError
from toolkit.sim.attacks import Attack, parse_attack
from toolkit.sim.simulate import SimOptions, check_options, run_simulation


def _run(attack: str, rule: str | None = None, codec: str = "fp32", rounds: int = 3,
         **extra):
    robust = FedAvgOptions(robust=parse_rule(rule, **extra)) if rule else None
    report, _ = run_simulation(SimOptions(
        devices=8, rounds=rounds, epochs=1, lr=0.05, seed=0, codec=codec, attack=attack,
        norm_bound=float("inf"), state_parent="/dev/shm", strategy_options=robust))
    return report


def test_parse_attack_and_its_errors():
    assert parse_attack("signflip:4", 20) == Attack("signflip", 4, 0.0)
    assert parse_attack("noise:2:0.5", 20) == Attack("noise", 2, 0.5)
    assert parse_attack("absent:4", 20) == Attack("absent", 4, 0.0)
    for bad in ("flood:2", "lie", "lie:x", "lie:20", "noise:2:-1"):
        with pytest.raises(UsageError, match="--attack"):
            parse_attack(bad, 20)
    with pytest.raises(UsageError, match="drop --procs"):
        check_options(SimOptions(attack="lie:2", procs=2, broker="mqtt://x:1"))


@pytest.mark.slow  # a whole attacked run (8 s)
def test_colluding_liars_send_one_update_through_the_fp16_codec():
    """"A little is enough": both attackers send the same mean + z std of their honest
    updates, coded by fp16 like the rest; the honest devices' changes all differ."""
    report = _run("lie:2", codec="fp16", rounds=2)
    assert report["attack"] == "lie:2"
    for rec in report["rounds"]:
        rms = rec["change_rms"]
        assert rms["dev-0"] == pytest.approx(rms["dev-1"], rel=1e-6)
        assert len({round(v, 9) for d, v in rms.items() if d not in ("dev-0", "dev-1")}) == 6


def test_absent_devices_never_join_and_the_others_keep_their_shards():
    """The oracle's run: dev-0 and dev-1 never join, the round closes on the other six,
    whose shards are those of the 8-device partition (the same sizes as with all 8)."""
    report = _run("absent:2", rounds=1)
    full = {d["id"]: d["samples"] for d in _run("", rounds=1)["devices"]}
    assert [d["id"] for d in report["devices"]] == [f"dev-{k}" for k in range(2, 8)]
    assert {d["id"]: d["samples"] for d in report["devices"]} == \
        {d: n for d, n in full.items() if d not in ("dev-0", "dev-1")}
    assert sorted(report["rounds"][0]["change_rms"]) == [f"dev-{k}" for k in range(2, 8)]


@pytest.mark.slow
def test_noise_is_contained_by_krum():
    plain, krum = _run("noise:2"), _run("noise:2", "multikrum:2")
    assert plain["final_accuracy"] < 0.2  # two noisy devices wreck the mean
    assert krum["final_accuracy"] > plain["final_accuracy"] + 0.1
    for rec in krum["rounds"]:  # Krum never picks an attacker
        assert not {"dev-0", "dev-1"} & set(rec["robust"]["chosen"])


@pytest.mark.slow
def test_boosted_replacement_is_contained_by_adaptive_clipping():
    plain, clip = _run("replace:2"), _run("replace:2", "mean", clip_quantile=0.5)
    assert clip["final_accuracy"] > plain["final_accuracy"] + 0.1
    assert all(rec["robust"]["clipped"] >= 2 for rec in clip["rounds"])


@pytest.mark.slow
def test_sign_flipping_is_contained_by_the_trimmed_mean():
    # 3 of 8 send their change reversed x 4: the mean walks backwards
    plain, trimmed = _run("signflip:3:4"), _run("signflip:3:4", "trimmed:0.375")
    assert trimmed["final_accuracy"] > plain["final_accuracy"] + 0.1


@pytest.mark.slow
def test_sign_flipping_is_contained_by_fltrust():
    # 3 of 8 reversed x 4: their changes point away from the server's own training on
    # its public split, so they get no trust in any round
    plain, fl = _run("signflip:3:4"), _run("signflip:3:4", "fltrust")
    assert fl["final_accuracy"] > plain["final_accuracy"] + 0.1
    for rec in fl["rounds"]:
        assert rec["robust"]["rule"] == "fltrust:clip"
        assert not {"dev-0", "dev-1", "dev-2"} & set(rec["robust"]["chosen"]), rec["robust"]
