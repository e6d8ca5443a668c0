"""What a device command costs to start: ``fedge infer`` of one sample with torch
unimportable, as a device runs it (the ``fedge`` entry point in a fresh process).

For each code tree given (``--tree NAME=PATH``, e.g. the old code in a detached
worktree and this one), one warm-up run, then ``--reps`` runs interleaved between the
trees so that a loaded machine slows them alike; per run the wall time of the whole
process and its peak RSS (GNU time's ``%M``); medians and the ratios to the first
tree. ``--breakdown`` adds, for each tree, where one run's time goes: the top-level
imports (``-X importtime``).

    python bench/startup.py --manifest DIR --device rpi4 --trust PUB \\
        --tree old=/tmp/wt-export-old --tree new=. --json docs/results/startup.json
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

TIME = "/usr/bin/time"
# What a device without torch runs: the console script's two lines, torch blocked.
ENTRY = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _Block())
from toolkit.cli.main import main
sys.exit(main())
"""


def run_once(tree: Path, args: list[str], extra: list[str] = ()) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr) of one ``fedge`` process from ``tree``; the
    stderr ends with GNU time's line, which ``cpu_seconds`` reads.

    The peak comes from GNU time, a small C parent: Linux counts in a child's
    ``ru_maxrss`` the parent's pages at fork, so measured from this (numpy-laden)
    process every child would look at least as large as the bench itself."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    p = subprocess.run([TIME, "-f", "FEDGE_PEAK_KB=%M FEDGE_CPU_S=%U+%S", sys.executable,
                        *extra, "-c", ENTRY, *args], env=env, cwd=tree, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"fedge {' '.join(args)} from {tree} exited {p.returncode}: "
                         f"{p.stderr.strip().splitlines()[-1:]}")
    peak = [ln for ln in p.stderr.splitlines() if ln.startswith("FEDGE_PEAK_KB=")][-1]
    return wall, int(peak.split()[0].split("=")[1]) / 1024, p.stderr


def cpu_seconds(stderr: str) -> float:
    """User + system CPU seconds of the run (less bent by a loaded machine than wall)."""
    line = [ln for ln in stderr.splitlines() if ln.startswith("FEDGE_PEAK_KB=")][-1]
    user, system = line.split("FEDGE_CPU_S=")[1].split("+")
    return float(user) + float(system)


def top_imports(stderr: str, n: int = 12) -> list[list]:
    """The slowest top-level imports of a ``-X importtime`` run: [module, cumulative ms]."""
    rows = []
    for line in stderr.splitlines():
        parts = line.split("|")
        if not line.startswith("import time:") or len(parts) != 3 or "cumulative" in line:
            continue
        name = parts[2][1:]  # one space, then two more per nesting level
        if not name.startswith(" "):
            rows.append([name.strip(), int(parts[1]) / 1e3])
    rows.sort(key=lambda r: -r[1])
    return rows[:n]


def bench(trees: dict[str, Path], args: list[str], reps: int) -> dict:
    runs = {name: [] for name in trees}
    for name, tree in trees.items():
        run_once(tree, args)  # warm-up: page cache, .pyc files
    for _ in range(reps):
        for name, tree in trees.items():
            wall, rss, err = run_once(tree, args)
            runs[name].append({"wall_s": round(wall, 4), "peak_rss_mb": round(rss, 1),
                               "cpu_s": round(cpu_seconds(err), 2)})
    out = {}
    first = next(iter(trees))
    for name in trees:
        walls = [r["wall_s"] for r in runs[name]]
        rsss = [r["peak_rss_mb"] for r in runs[name]]
        out[name] = {"tree": str(trees[name]), "median_wall_s": statistics.median(walls),
                     "median_cpu_s": statistics.median(r["cpu_s"] for r in runs[name]),
                     "median_peak_rss_mb": statistics.median(rsss), "runs": runs[name]}
    for name in trees:
        out[name]["wall_ratio_to_" + first] = round(
            out[name]["median_wall_s"] / out[first]["median_wall_s"], 3)
        out[name]["rss_ratio_to_" + first] = round(
            out[name]["median_peak_rss_mb"] / out[first]["median_peak_rss_mb"], 3)
    return out


def breakdown(tree: Path, args: list[str]) -> dict:
    _, _, err = run_once(tree, args, ["-X", "importtime"])
    return {"top_level_imports_ms": top_imports(err)}


def to_markdown(res: dict) -> str:
    first = next(iter(res["trees"]))
    lines = [f"`{res['command']}` — {res['machine']}, load: {res['uptime']}", "",
             f"| tree | median wall s | median CPU s | median peak RSS MB | wall ratio to "
             f"{first} | RSS ratio to {first} |", "|---|---|---|---|---|---|"]
    for name, r in res["trees"].items():
        lines.append(f"| {name} | {r['median_wall_s']:.3f} | {r['median_cpu_s']:.2f} | "
                     f"{r['median_peak_rss_mb']:.1f} | "
                     f"{r['wall_ratio_to_' + first]:.2f} | {r['rss_ratio_to_' + first]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--device", default="rpi4")
    ap.add_argument("--trust", required=True)
    ap.add_argument("--tree", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--breakdown", action="store_true")
    ap.add_argument("--json", required=True)
    ap.add_argument("--md")
    a = ap.parse_args()
    trees = {t.split("=", 1)[0]: Path(t.split("=", 1)[1]).resolve() for t in a.tree}
    with tempfile.TemporaryDirectory() as tmp:
        import numpy as np

        from toolkit.model.datasets import load_mnist1d

        sample = Path(tmp) / "one.npy"
        np.save(sample, load_mnist1d().x_test[:1])
        args = ["infer", "--manifest", a.manifest, "--device", a.device, "--trust", a.trust,
                "--input", str(sample)]
        res = {"command": command("bench/startup.py"), "machine": machine(),
               "uptime": subprocess.run(["uptime"], capture_output=True,
                                        text=True).stdout.strip(),
               "reps": a.reps, "trees": bench(trees, args, a.reps)}
        if a.breakdown:
            res["breakdown"] = {name: breakdown(tree, args) for name, tree in trees.items()}
    res["uptime_after"] = subprocess.run(["uptime"], capture_output=True,
                                         text=True).stdout.strip()
    write_results(res, a.json, a.md, to_markdown)


if __name__ == "__main__":
    main()
