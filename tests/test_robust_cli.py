"""``fedge simulate``/``fedge serve`` with robust flags: an unknown or inconsistent
choice is a one-line error with a non-zero exit before anything runs; a valid one
names the rule in the report and gives DP's epsilon per round."""
import json

import pytest

from toolkit.cli.main import main

SIM = ["simulate", "--devices", "6", "--rounds", "2", "--epochs", "1"]


def _serve(tmp_path, *extra):
    return ["serve", "--job", "j1", "--checkpoint", str(tmp_path / "none.pt"),
            "--state-dir", str(tmp_path / "state"), *extra]


BAD = [
    (["--robust", "krum:2"], "krum: needs more than 2f + 2 = 6 devices"),
    (["--robust", "multikrum:1:9"], "multikrum: m must be in"),
    (["--robust", "trimmed:0.5"], "trimmed mean: beta must be in"),
    (["--robust", "bulyan"], "unknown rule 'bulyan'"),
    (["--robust", "krum:x"], "not a number"),
    (["--dp-noise", "1.0"], "dp: noise without clipping"),
    (["--dp-noise", "1.0", "--clip-quantile", "0.5"], "dp: needs a fixed clip bound"),
    (["--dp-noise", "1.0", "--clip", "1", "--robust", "median"], "dp: the noise is calibrated"),
    (["--clip", "1", "--clip-quantile", "0.5"], "not both"),
    (["--clip", "-1"], "clip: bound must be >= 0"),
    (["--strategy", "signsgd", "--codec", "sign", "--robust", "median"],
     "--robust: strategy signsgd does not support it"),
    (["--strategy", "signsgd", "--codec", "sign", "--clip", "2"],
     "--clip: strategy signsgd does not support it"),
    (["--vote-cap", "0.2"], "--vote-cap: strategy fedavg does not support it"),
    (["--strategy", "signsgd", "--codec", "sign", "--vote-cap", "0.1"],
     "6 devices a round cannot each hold at most 0.1"),
    (["--share-cap", "0.2"], "--share-cap: caps FedMRN mask folds"),
    (["--codec", "fedmrn", "--share-cap", "0.1"], "6 devices a round cannot each hold"),
    (["--strategy", "signsgd", "--codec", "sign", "--share-cap", "0.5"],
     "--share-cap: strategy signsgd does not support it"),
    (["--attack", "bribe:2"], "--attack: unknown kind 'bribe'"),
    (["--attack", "signflip:6"], "--attack: count must be in [0, 5]"),
]


@pytest.mark.parametrize("flags,message", BAD)
def test_simulate_refuses_a_bad_robust_choice_in_one_line(tmp_path, capsys, monkeypatch,
                                                           flags, message):
    _never(monkeypatch, "toolkit.sim.simulate.run_simulation")
    code = main([*SIM, *flags, "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and "\n" not in err
    assert not (tmp_path / "r.json").exists()


def _never(monkeypatch, target: str) -> None:
    """The run itself must not start: the check comes before it."""
    def refuse(*a, **k):
        raise AssertionError(f"{target} ran")
    monkeypatch.setattr(target, refuse)


def test_serve_checks_krum_against_the_quorum_before_anything(tmp_path, capsys, monkeypatch):
    _never(monkeypatch, "toolkit.field.serve.run_serve")
    # 2 devices a round (--min-devices) cannot give Krum its n > 2f + 2
    code = main(_serve(tmp_path, "--robust", "krum:1", "--min-devices", "2"))
    err = capsys.readouterr().err.strip()
    assert code != 0 and "krum: needs more than 2f + 2 = 4 devices" in err and "\n" not in err
    assert not (tmp_path / "state").exists()
    code = main(_serve(tmp_path, "--dp-noise", "2"))
    assert code != 0 and "dp: noise without clipping" in capsys.readouterr().err


def test_serve_root_data_rules_need_root_data_and_names_a_bad_file(tmp_path, capsys, monkeypatch):
    import numpy as np

    from toolkit.errors import UsageError
    from toolkit.field.root_data import load_root

    _never(monkeypatch, "toolkit.field.serve.run_serve")
    for rule in ("zeno:1", "fltrust"):
        code = main(_serve(tmp_path, "--robust", rule, "--min-devices", "4"))
        err = capsys.readouterr().err.strip()
        name = rule.split(":")[0]
        assert code != 0 and f"--robust {name}: expected --root-data FILE" in err
        assert "\n" not in err and not (tmp_path / "state").exists()
    bad = tmp_path / "root.npz"
    np.savez(bad, x=np.zeros((3, 4)), y=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(UsageError, match="expected as many integer labels y"):
        load_root(bad)
    with pytest.raises(UsageError, match="expected an .npz with arrays x and y"):
        load_root(tmp_path / "missing.npz")


def test_simulate_reports_the_rule_and_epsilon_per_round(tmp_path):
    out = tmp_path / "r.json"
    # The guard off: a noisy model makes every next change large against the last
    # round's median, and the guard would refuse them all (see docs/strategies.md).
    code = main([*SIM, "--clip", "5", "--dp-noise", "2", "--dp-seed", "1", "--norm-bound",
                 "inf", "--json", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["robust"] == "mean+clip:5+dp:2"
    eps = [r["robust"]["epsilon"] for r in report["rounds"]]
    assert len(eps) == 2 and 0 < eps[0] < eps[1] == report["dp"]["epsilon"]
    assert report["rounds"][0]["robust"]["sampling_rate"] == 1.0
