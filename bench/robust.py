"""Benchmark robust aggregation and central DP against attacking devices (MNIST-1D).

20 devices, Dirichlet 0.5, for 0, 2 and 4 attackers of each kind (replace, signflip,
noise, lie, labelflip: ``fedge simulate --attack``, toolkit/sim/attackers.py), the
final accuracy of FedAvg (mean) and of each rule (median, trimmed:0.1, multikrum:4,
mean with adaptive clip at the median norm, zeno:4 and fltrust with the server's public
split of 400 labelled samples as their root data), with fp32 updates and with FedMRN's 1-bit
masks; medians over the seeds. The aggregator's norm guard is off (``--norm-bound
inf``) so that the rules, not the guard, are measured (with it on, replace and noise
are refused from round 2 on). Central DP: FedAvg with a fixed clip and the noise the
accountant (dp-accounting, RDP) calibrates for epsilon 1, 4 and 8 at delta 1e-5 over
the same rounds, every device in every round (sampling rate 1).

    nice python bench/robust.py --jobs 2 --json docs/results/robust.json \\
        --md docs/results/robust.md
    python bench/robust.py --quick --json /tmp/robust.json    # 1 seed, 4 attackers, fp32
    python bench/robust.py --rounds 20 --arms 'fp32|mean|none,fp32|oracle|absent:4' ...

``fp32|oracle|absent:4``: FedAvg over the 16 honest devices only (the attackers' four
never join; the others keep their shards of the 20-device partition), the ceiling of
any rule that removes the attackers. ``sign|fv[ cap:C]|attack``: signSGD-FV (codec
sign), without and with ``--vote-cap``. The md's ``## Findings`` on are kept when the
tables are written again.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import (command, machine, passive_waits, started_code,  # noqa: E402
                          threads_arg, use_threads, write_results)

passive_waits()  # before torch loads (below)

from broker_server.robust import parse_rule  # noqa: E402
from broker_server.strategies import FedAvgOptions  # noqa: E402
from toolkit.sim.simulate import SimOptions, run_simulation  # noqa: E402

from bench.robust_report import (  # noqa: E402
    DEFAULT,
    KINDS,
    ORACLE,
    RULES,
    SIGN_LR,
    SIGN_RULES,
    SIGN_STEPS,
    SIGN_SWEEP,
    kept,
    to_markdown,
)

SIGN_ATTACKS = ("none", "signflip:4", "replace:4")
EPSILONS = (1.0, 4.0, 8.0)
DELTA = 1e-5


def base(args) -> SimOptions:
    return SimOptions(devices=20, rounds=args.rounds, alpha=0.5, epochs=args.epochs,
                      lr=args.lr, profiles=("rpi3b", "rpi4", "rpi5", "jetson-orin-nano"),
                      state_parent="/dev/shm" if os.path.isdir("/dev/shm") else None,
                      norm_bound=float("inf"))


def robust_of(rule: str) -> FedAvgOptions | None:
    if RULES[rule] is None:
        return None  # plain FedAvg: no wrapper at all
    extra = {"clip_quantile": 0.5} if rule == "clip:q0.5" else {}
    return FedAvgOptions(robust=parse_rule(RULES[rule], **extra))


def sign_of(rule: str, profiles: tuple[str, ...]):
    """signSGD-FV's options for an arm's rule: ``fv`` then ``cap:C``, ``lr:X``,
    ``steps:K`` (the vote cap, server step and local steps; defaults SIGN_*)."""
    from broker_server.strategies import SignSGDOptions
    from toolkit.planning.profiles import ProfileCatalogue
    from toolkit.sim.simulate import batch_by_compute

    kw = dict(tuple(part.split(":")) for part in rule.split()[1:])
    cat = ProfileCatalogue.load()
    return SignSGDOptions("fv", server_lr=float(kw.get("lr", SIGN_LR)),
                          local_steps=int(kw.get("steps", SIGN_STEPS)),
                          vote_cap=float(kw.get("cap", 0.0)),
                          batch_by_profile=batch_by_compute([cat.get(p) for p in profiles]))


def grid(args) -> list[tuple[str, SimOptions, list[int]]]:
    """(arm name, options, seeds), most needed first (a bench stopped early has the
    acceptance cells): fp32 clean and with 4 attackers on the first seed, then on the
    other seeds, the oracle (the 4 attackers' devices absent), the 1-bit codec with none
    and 4 (``--side-seeds``), then fp32 with 2 attackers (``--side-seeds``)."""
    b, seeds, side = base(args), _ints(args.seeds), _ints(args.side_seeds)
    kinds = [f"{k}:4" for k in KINDS]
    first, rest = seeds[:1], seeds[1:]  # every arm once before any arm twice
    tiers = [("fp32", list(RULES), ["none", *kinds], first),
             ("fp32", list(RULES), ["none", *kinds], rest)]
    if not args.quick:
        for codec in args.codecs.split(","):
            if codec != "fp32":
                tiers.append((codec, args.onebit_rules.split(","), ["none", *kinds], side))
    if not args.quick:
        tiers.append(("fp32", list(RULES), [f"{k}:2" for k in KINDS], side))
        tiers += [("sign", list(SIGN_RULES), list(SIGN_ATTACKS), side),
                  ("sign", list(SIGN_SWEEP), ["none"], side)]
    out = []
    for i, (codec, rules, attacks, tier_seeds) in enumerate(tiers):
        for attack in attacks:
            for rule in rules:
                how = dict(strategy="signsgd", strategy_options=sign_of(rule, b.profiles)) \
                    if codec == "sign" else dict(strategy_options=robust_of(rule))
                out.append((f"{codec}|{rule}|{attack}", replace(
                    b, codec=codec, attack="" if attack == "none" else attack, **how),
                    tier_seeds))
        if i == 1:  # plain FedAvg, its 4 first devices never joining
            out.append((ORACLE, replace(b, attack=ORACLE.split("|")[2]), seeds))
    return out


def chosen(args) -> list[tuple[str, SimOptions, int]]:
    """The runs to do: the whole grid, or (``--arms``) the arms named, in that order,
    each on every one of ``--seeds``."""
    dp = [] if args.no_dp else dp_grid(args)
    if not args.arms:
        tasks = [(n, o, s) for n, o, seeds in grid(args) for s in seeds]
        # DP after the first pass over fp32 (few runs, all needed)
        at = next((i for i, t in enumerate(tasks) if t[2] not in _ints(args.side_seeds)),
                  len(tasks))
        tasks[at:at] = [(n, o, s) for n, o, _ in dp for s in _ints(args.side_seeds)]
        return tasks
    known = {n: o for n, o, _ in grid(replace_args(args, quick=False))}
    known.update({n: o for n, o, _ in dp_grid(args)})
    names = [a.strip() for a in args.arms.split(",")]
    bad = [a for a in names if a not in known]
    if bad:
        raise ValueError(f"--arms: unknown arm {bad[0]!r}; an arm is codec|rule|attack as "
                         f"in the tables, e.g. fp32|mean|none or {ORACLE}")
    return [(n, known[n], s) for n in names for s in _ints(args.seeds)]


def replace_args(args, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")] if text else []


def dp_grid(args) -> list[tuple[str, SimOptions, float]]:
    """(arm, options, noise multiplier): clipped FedAvg with the noise for each epsilon."""
    from broker_server.robust.accountant import noise_multiplier

    b, out = base(args), []
    for clip in (float(c) for c in args.dp_clips.split(",")):
        out.append((f"dp|clip:{clip:g}|none", replace(b, strategy_options=FedAvgOptions(
            robust=parse_rule("mean", clip=clip))), 0.0))
        for eps in EPSILONS:
            z = noise_multiplier(eps, args.rounds, 1.0, DELTA)
            opts = FedAvgOptions(robust=parse_rule("mean", clip=clip, dp_noise=z,
                                                   delta=DELTA), dp_seed=0)
            out.append((f"dp|clip:{clip:g} eps:{eps:g}|none", replace(b, strategy_options=opts),
                        z))
    return out


def cached(path: str) -> dict[tuple[str, int], dict]:
    """The runs already done (``--cache``, one JSON object a line), by (arm, seed)."""
    if not path or not Path(path).exists():
        return {}
    runs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {(r["arm"], r["seed"]): r for r in runs}


def one(task: tuple[str, SimOptions, int]) -> dict:
    name, opts, seed = task
    t0 = time.time()
    report, _ = run_simulation(replace(opts, seed=seed))
    rounds = report["rounds"]
    out = {"arm": name, "seed": seed, "final_accuracy": report["final_accuracy"],
           "accuracy": [r["accuracy"] for r in rounds], "seconds": round(time.time() - t0, 1),
           "robust": report.get("robust"), "refused": sum(len(r["refused"]) for r in rounds),
           # per run: --cache joins runs of several invocations, maybe of several versions
           "code": started_code(), "threads": report["threads"]}
    if "dp" in report:
        out["epsilon"] = report["dp"]["epsilon"]
        out["epsilon_per_round"] = [r["robust"]["epsilon"] for r in rounds]
    print(f"{name} seed {seed}: {report['final_accuracy']:.4f} ({out['seconds']} s)",
          flush=True)
    return out


def summarize(runs: list[dict]) -> dict:
    by: dict[str, list[dict]] = {}
    for r in runs:
        by.setdefault(r["arm"], []).append(r)
    out = {}
    for arm, rs in by.items():
        finals = [r["final_accuracy"] for r in rs]
        out[arm] = {"median": round(statistics.median(finals), 4), "finals": finals,
                    "seeds": [r["seed"] for r in rs]}
        if "epsilon" in rs[0]:
            out[arm]["epsilon"] = rs[0]["epsilon"]
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="fp32, clean and 4 attackers")
    ap.add_argument("--side-seeds", default="0",
                    help="fp32 with 2 attackers, the 1-bit codec and DP")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--codecs", default="fp32,fedmrn")
    ap.add_argument("--onebit-rules", default="mean,median,zeno:4,fltrust")
    ap.add_argument("--dp-clips", default="2,8",
                    help="DP's fixed clip bounds (comma list; the median change norm is "
                    "~2 late and ~8 in round 1)")
    ap.add_argument("--no-dp", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="one seed, 4 attackers only, fp32 only, no DP")
    ap.add_argument("--arms", help="run only these arms (comma list, e.g. "
                    f"fp32|mean|none,{ORACLE}), in this order, each on every --seeds")
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    ap.add_argument("--cache", help="append each finished run here (JSON lines) and skip "
                    "the runs already in it (a bench stopped early resumes)")
    ap.add_argument("--report-only", action="store_true",
                    help="write the tables from --cache without running anything")
    ap.add_argument("--json", default="runs/bench_robust.json")
    ap.add_argument("--md")
    threads_arg(ap)
    return ap


def main() -> None:
    ap = parser()
    args = ap.parse_args()
    use_threads(args.threads)  # before the pool: its workers inherit it
    if args.quick:
        args.seeds, args.codecs, args.no_dp = "0", "fp32", True
    try:
        tasks = chosen(args)
    except ValueError as e:
        ap.error(str(e))
    names = {t[0] for t in tasks}
    dp = [d for d in dp_grid(args) if d[0] in names]
    done = cached(args.cache)
    todo = [] if args.report_only else [t for t in tasks if (t[0], t[2]) not in done]
    print(f"{len(tasks)} runs, {len(tasks) - len(todo)} cached, on {args.jobs} processes",
          flush=True)
    t0 = time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        for fut in as_completed([pool.submit(one, t) for t in todo]):
            r = fut.result()
            done[(r["arm"], r["seed"])] = r
            if args.cache:
                with open(args.cache, "a") as f:
                    f.write(json.dumps(r) + "\n")
    wanted = {(n, s) for n, _, s in tasks}
    runs = [r for k, r in done.items() if k in wanted]
    res = {"machine": machine(), "command": command("bench/robust.py"),
           "seeds": _ints(args.seeds), "side_seeds": _ints(args.side_seeds),
           "devices": 20, "rounds": args.rounds, "epochs": args.epochs, "lr": args.lr,
           "default": DEFAULT, "dp_clips": args.dp_clips, "delta": DELTA,
           "dp_noise": {n: z for n, _, z in dp}, "wall_seconds": round(time.time() - t0),
           "runs_planned": len(tasks), "runs_done": len(runs),
           "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
           "runs": runs, "summary": summarize(runs)}
    notes = kept(args.md)
    write_results(res, args.json, args.md, lambda r: to_markdown(r) + notes)


if __name__ == "__main__":
    main()
