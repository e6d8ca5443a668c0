"""Soak: a long run of real processes under a seeded schedule of faults, with proof.

One Mosquitto, one ``fedge serve`` (FedAvg over the 1-bit ``fedmrn`` uplink, whose
fold sums integer mask bits, so a recomputation is bit-exact) and ``--devices``
``fedge device`` processes train the width-0.5 cnn on MNIST-1D for ``--rounds``
rounds. Meanwhile a seeded schedule SIGKILLs a random device every few rounds and
restarts it a few rounds later, SIGKILLs the aggregator once (at 40% of the run,
once an update of the open round is persisted) and restarts it on the same state
dir, and restarts the broker once (at 70%, mid-round; the broker keeps nothing).

The engine is ``testkit/soak.py`` (tests/test_soak.py runs it too). An independent
observer records every update and model frame on the broker
(``testkit/soak_check.py``); afterwards every round record is checked: each accepted
update was folded exactly once (recomputing the aggregate from the observed
payloads reproduces the next model bit for bit), and the aggregator's RSS did not
grow round over round (least-squares slope per aggregator process, after a
warm-up, under ``--rss-bound-mb``). The harness also samples every device
process's RSS once per round.

    python bench/soak.py --rounds 50 --json docs/results/soak.json --md docs/results/soak.md
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command, machine, write_results  # noqa: E402
from testkit.soak import SoakConfig, run_soak  # noqa: E402
from testkit.soak_report import to_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = SoakConfig()
    for name in ("rounds", "devices", "seed", "min_devices", "warmup", "min_fit_rounds"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    for name in ("round_timeout", "rss_bound_mb", "max_seconds"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(d, name))
    p.add_argument("--codec", default=d.codec)
    p.add_argument("--workdir", help="keep logs and state here (default: a temp folder)")
    p.add_argument("--json", default="soak.json")
    p.add_argument("--md")
    a = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the devices share the cores
    cfg = SoakConfig(a.rounds, a.devices, a.seed, a.min_devices, a.round_timeout, a.codec,
                     warmup=a.warmup, min_fit_rounds=a.min_fit_rounds,
                     rss_bound_mb=a.rss_bound_mb, max_seconds=a.max_seconds,
                     workdir=a.workdir)
    res = run_soak(cfg)
    res.update(command=command("bench/soak.py"), machine=machine())
    write_results(res, a.json, a.md, to_markdown)
    for f in res["failures"]:
        print("FAILED:", f)
    return 0 if res["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
