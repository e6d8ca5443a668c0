"""What a device command costs to start: ``fedge infer`` of one sample with torch
unimportable, as a device runs it (the ``fedge`` entry point in a fresh process).

For each code tree given (``--tree NAME=PATH``, e.g. the old code in a detached
worktree and this one), one warm-up run, then ``--reps`` runs interleaved between the
trees so that a loaded machine slows them alike; per run the wall time of the whole
process and its peak RSS (GNU time's ``%M``); medians and the ratios to the first
tree. ``--breakdown`` adds, for each tree, where one run's time goes: the top-level
imports (``-X importtime``). ``--floor`` adds a row interleaved with the trees: the
same work with nothing of fedge (numpy, onnxruntime, the SHA-256 of the manifest and
the artifact, a one-thread session on it, one prediction; the manifest's signature is
remembered from the warm-up run), what no code of fedge's can go below with these
wheels. ``--python`` runs another interpreter, e.g. a
venv with only the device requirements, as a device has (no editable-install finder,
no .pth files of this machine's site-packages).

    python bench/startup.py --manifest DIR --device rpi4 --trust PUB \\
        --tree old=/tmp/wt-export-old --tree new=. --floor --json docs/results/startup.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import command, machine, write_results  # noqa: E402

TIME = "/usr/bin/time"
# What a device without torch runs: the console script's two lines, torch blocked.
BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is not installed on this device")
sys.meta_path.insert(0, _Block())
"""
# The floor: what `fedge infer --trust` must do on a start after the first, written with
# nothing of fedge: numpy, onnxruntime, the SHA-256 of the manifest and the model by
# CPython's own module (the signature is remembered, device_runtime.verified), a
# one-thread session without graph rewrites, one prediction. argv: manifest, its .sig,
# the trusted PEM, the artifact, the sample.
FLOOR = """
import os, sys
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np
import onnxruntime as ort
from _sha256 import sha256
manifest, sig, pem, model, sample = sys.argv[1:]
digests = [sha256(open(p, "rb").read()).hexdigest() for p in (manifest, sig, pem)]
data = open(model, "rb").read()
digests.append(sha256(data).hexdigest())
so = ort.SessionOptions()
so.intra_op_num_threads = so.inter_op_num_threads = 1
so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
s = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
print(s.run(None, {s.get_inputs()[0].name: np.load(sample).astype(np.float32)})[0].argmax())
"""


def entry(tree: Path) -> str:
    """The tree's ``fedge`` console script (pyproject.toml's), run with torch blocked."""
    data = tomllib.loads((tree / "pyproject.toml").read_text())
    module, func = data["project"]["scripts"]["fedge"].split(":")
    return BLOCK_TORCH + f"from {module} import {func}\nsys.exit({func}())\n"


def run_once(code: str, cwd: Path, args: list[str], extra: list[str] = (),
             python: str = sys.executable) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MB, stderr) of one process running ``code`` from ``cwd``
    (a tree, on PYTHONPATH too); the stderr ends with GNU time's line, which
    ``cpu_seconds`` reads.

    The peak comes from GNU time, a small C parent: Linux counts in a child's
    ``ru_maxrss`` the parent's pages at fork, so measured from this (numpy-laden)
    process every child would look at least as large as the bench itself."""
    env = dict(os.environ, PYTHONPATH=str(cwd))
    t0 = time.perf_counter()
    p = subprocess.run([TIME, "-f", "FEDGE_PEAK_KB=%M FEDGE_CPU_S=%U+%S", python,
                        *extra, "-c", code, *args], env=env, cwd=cwd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(args)} from {cwd} exited {p.returncode}: "
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


def bench(runners: dict[str, tuple[str, Path, list[str]]], reps: int, python: str) -> dict:
    """Per runner (name: code, folder, argv), one warm-up, then ``reps`` runs interleaved
    with the others; medians and ratios to the first."""
    runs = {name: [] for name in runners}
    for code, cwd, args in runners.values():
        run_once(code, cwd, args, python=python)  # warm-up: page cache, .pyc files
    for _ in range(reps):
        for name, (code, cwd, args) in runners.items():
            wall, rss, err = run_once(code, cwd, args, python=python)
            runs[name].append({"wall_s": round(wall, 4), "peak_rss_mb": round(rss, 1),
                               "cpu_s": round(cpu_seconds(err), 2)})
    out = {}
    first = next(iter(runners))
    for name in runners:
        walls = [r["wall_s"] for r in runs[name]]
        rsss = [r["peak_rss_mb"] for r in runs[name]]
        out[name] = {"tree": str(runners[name][1]), "median_wall_s": statistics.median(walls),
                     "median_cpu_s": statistics.median(r["cpu_s"] for r in runs[name]),
                     "median_peak_rss_mb": statistics.median(rsss), "runs": runs[name]}
    for name in runners:
        out[name]["wall_ratio_to_" + first] = round(
            out[name]["median_wall_s"] / out[first]["median_wall_s"], 3)
        out[name]["rss_ratio_to_" + first] = round(
            out[name]["median_peak_rss_mb"] / out[first]["median_peak_rss_mb"], 3)
    return out


def breakdown(code: str, cwd: Path, args: list[str], python: str) -> dict:
    _, _, err = run_once(code, cwd, args, ["-X", "importtime"], python=python)
    return {"top_level_imports_ms": top_imports(err)}


def floor_args(manifest: str, device: str, trust: str, sample: Path) -> list[str]:
    """FLOOR's argv: the manifest, its signature, the key, the device's fp32 ONNX model."""
    path = Path(manifest)
    path = path / "manifest.json" if path.is_dir() else path
    arts = json.loads(path.read_text())["devices"][device]["artifacts"]
    model = next(a["path"] for a in arts if (a["role"], a["precision"], a["format"]) ==
                 ("full", "fp32", "onnx"))
    return [str(path), str(path) + ".sig", trust, str(path.parent / model), str(sample)]


def to_markdown(res: dict) -> str:
    first = next(iter(res["trees"]))
    lines = [f"`{res['command']}` — {res['machine']}, {res.get('python', 'python')}; "
             f"load at the start: {res['uptime']}; at the end: {res.get('uptime_after')}", "",
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
    ap.add_argument("--floor", action="store_true", help="add the no-fedge floor's row")
    ap.add_argument("--python", default=sys.executable, help="the interpreter the runs use")
    ap.add_argument("--cold", metavar="NAME", help="add a row for tree NAME's first start "
                    "on a device: a new FEDGE_HOME each run, so the signature is checked")
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
        os.environ["FEDGE_HOME"] = str(Path(tmp) / "home")  # the ledger, remembered checks
        runners = {name: (entry(tree), tree, args) for name, tree in trees.items()}
        if a.cold:
            fresh = f"import os\nos.environ['FEDGE_HOME'] = '{tmp}/cold-%d' % os.getpid()\n"
            runners[f"{a.cold} (first start)"] = (fresh + entry(trees[a.cold]),
                                                  trees[a.cold], args)
        if a.floor:
            runners["floor"] = (FLOOR, Path(tmp), floor_args(a.manifest, a.device, a.trust,
                                                              sample))
        res = {"command": command("bench/startup.py"), "machine": machine(),
               "python": a.python, "uptime": _uptime(), "reps": a.reps,
               "trees": bench(runners, a.reps, a.python)}
        if a.breakdown:
            res["breakdown"] = {name: breakdown(*runners[name], a.python) for name in trees}
    res["uptime_after"] = _uptime()
    write_results(res, a.json, a.md, to_markdown)


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    main()
