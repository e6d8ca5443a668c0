"""bench/robust.py's choice of runs: ``--arms`` runs the arms named, in that order, on
every seed (the oracle among them: its four devices absent), and an unknown arm is a
one-line error before anything runs."""
import subprocess
import sys

import pytest

from bench.robust import ORACLE, chosen, parser
from testkit import ROOT


def test_arms_are_run_in_the_order_named_on_every_seed():
    args = parser().parse_args(["--arms", f"{ORACLE},fp32|mean|none", "--seeds", "0,2",
                                "--rounds", "20"])
    tasks = chosen(args)
    assert [(n, s) for n, _, s in tasks] == [(ORACLE, 0), (ORACLE, 2),
                                             ("fp32|mean|none", 0), ("fp32|mean|none", 2)]
    oracle = tasks[0][1]
    assert (oracle.attack, oracle.strategy_options, oracle.rounds) == ("absent:4", None, 20)


def test_the_whole_grid_has_the_oracle_on_every_seed_and_signsgd_with_a_vote_cap():
    tasks = chosen(parser().parse_args([]))
    assert [s for n, _, s in tasks if n == ORACLE] == [0, 1, 2]
    sign = {n: o for n, o, _ in tasks}["sign|fv cap:0.1|replace:4"]
    assert (sign.strategy, sign.codec, sign.attack) == ("signsgd", "sign", "replace:4")
    assert (sign.strategy_options.decoder, sign.strategy_options.vote_cap) == ("fv", 0.1)


def test_an_unknown_arm_is_a_one_line_error():
    with pytest.raises(ValueError, match="--arms: unknown arm 'fp32|krum|none'"):
        chosen(parser().parse_args(["--arms", "fp32|mean|none,fp32|krum|none"]))
    out = subprocess.run([sys.executable, "bench/robust.py", "--arms", "x", "--json",
                          "/dev/null"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.splitlines()[-1].startswith(
        "robust.py: error: --arms: unknown arm 'x'")
