"""What a busy neighbour does to ``fedge pretrain``: wall and CPU time, alone and beside
a second busy fedge process, for each code tree given (e.g. the code before the
thread policy, in a detached worktree, and this one).

Each measured run is ``python -m toolkit.cli.main pretrain`` from the tree (its cwd and
PYTHONPATH: ``-m`` puts the cwd first on the path), in a fresh process, with the
tree's own thread policy (nothing set in the environment). The ``--neighbours`` are
the same tree's pre-trainings of a bigger dataset, started first and killed when the
measured run ends, so a tree is measured against its own kind, as a user running
several fedge commands would see it. Runs are interleaved between the trees
(``--reps`` each); CPU time is the measured process's user + system time
(``os.wait4``), medians reported with the contended/alone ratios.

    python bench/threads.py --tree before=/tmp/wt-old --tree after=. \\
        --json docs/results/threads.json --md docs/results/threads.md
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command, machine, write_results  # noqa: E402

CLEAN = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "FEDGE_THREADS", "OMP_WAIT_POLICY",
         "KMP_BLOCKTIME", "OPENBLAS_NUM_THREADS")


def _env(tree: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN}
    env["PYTHONPATH"] = str(Path(tree).resolve())
    return env


def _pretrain(tree: str, out: Path, epochs: int, dataset: str) -> list[str]:
    return [sys.executable, "-m", "toolkit.cli.main", "pretrain", "--dataset", dataset,
            "--model", "cnn", "--epochs", str(epochs), "--out", str(out)]


def one(tree: str, epochs: int, neighbours: int, work: Path) -> dict:
    """(wall s, CPU s) of one pre-training, beside ``neighbours`` busy ones."""
    others = [subprocess.Popen(_pretrain(tree, work / f"n{i}.safetensors", 1000,
                                         "mnist1d:20000"), env=_env(tree), cwd=tree,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
              for i in range(neighbours)]
    if others:
        time.sleep(3.0 + neighbours)  # past their imports and data generation: training
    t0 = time.perf_counter()
    p = subprocess.Popen(_pretrain(tree, work / "m.safetensors", epochs, "mnist1d"),
                         env=_env(tree), cwd=tree, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    for n in others:
        n.kill()
        n.wait()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"pretrain in {tree} failed: {p.stderr.read().decode()[-300:]}")
    return {"wall_s": round(wall, 3), "cpu_s": round(ru.ru_utime + ru.ru_stime, 3)}


def run(args) -> dict:
    trees = dict(t.split("=", 1) for t in args.tree)
    runs: dict[str, dict[str, list[dict]]] = {n: {"alone": [], "busy": []} for n in trees}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.reps):
            for name, path in trees.items():
                for case in ("alone", "busy"):
                    r = one(path, args.epochs, args.neighbours if case == "busy" else 0,
                            Path(d))
                    runs[name][case].append(r)
                    print(f"{name} {case}: {r}", flush=True)
    rows = []
    for name, cases in runs.items():
        med = {c: {k: statistics.median(r[k] for r in rs) for k in ("wall_s", "cpu_s")}
               for c, rs in cases.items()}
        rows.append({"tree": name, "path": trees[name], **{f"{c}_{k}": v for c, m in med.items()
                                                           for k, v in m.items()},
                     "cpu_ratio": med["busy"]["cpu_s"] / med["alone"]["cpu_s"],
                     "wall_ratio": med["busy"]["wall_s"] / med["alone"]["wall_s"],
                     "runs": cases})
    return {"bench": "threads", "machine": machine(), "command": command(__file__),
            "epochs": args.epochs, "neighbours": args.neighbours, "reps": args.reps,
            "load": os.getloadavg(), "rows": rows}


def to_markdown(res: dict) -> str:
    lines = [f"# `fedge pretrain` alone and beside {res['neighbours']} busy fedge "
             "process(es)", "",
             f"`fedge pretrain --dataset mnist1d --model cnn --epochs {res['epochs']}`, "
             f"medians of {res['reps']} runs per cell, interleaved; each neighbour: the same "
             f"tree's pre-training on mnist1d:20000, already training. Machine "
             f"{res['machine']}; load average at the end "
             f"{', '.join(f'{v:.2f}' for v in res['load'])}; code {res.get('code', '?')}.", "",
             f"`{res['command']}`", "",
             "| code | alone wall s | alone CPU s | busy wall s | busy CPU s | CPU busy/alone "
             "| wall busy/alone |", "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['tree']} | {r['alone_wall_s']:.2f} | {r['alone_cpu_s']:.2f} | "
                     f"{r['busy_wall_s']:.2f} | {r['busy_cpu_s']:.2f} | {r['cpu_ratio']:.2f} | "
                     f"{r['wall_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--neighbours", type=int, default=1, help="busy fedge processes beside "
                    "the measured one in the busy case")
    ap.add_argument("--json", default="runs/bench_threads.json")
    ap.add_argument("--md")
    args = ap.parse_args()
    write_results(run(args), args.json, args.md, to_markdown)


if __name__ == "__main__":
    main()
