"""Run a bench twice with the same arguments and say whether its figures repeat.

Every figure a bench reports is compared, after dropping what is wall-clock by nature
(``WALL``: how long the run took, the server's compute as timed on this machine and
the simulated times built on it, the load). The two JSONs' digests and the first
differing fields are printed, and written with ``--out``:

    python bench/repeat.py --out runs/repeat.json -- \\
        python bench/split.py --arms ecofed-act8 --seeds 0 --rounds 3

The bench must take ``--json``; both runs write the same path, one after the other.
Exit 0 when identical, 1 when not (docs/results/reproducibility.md).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

WALL = {"seconds", "server_seconds", "server_seconds_per_round", "train_seconds_max",
        "simulated_seconds_measured", "simulated_elapsed_measured",
        "seconds_to_target_measured", "load", "uptime"}


def figures(value):
    """``value`` without the wall-clock entries, at any depth."""
    if isinstance(value, dict):
        return {k: figures(v) for k, v in value.items() if k not in WALL}
    if isinstance(value, list):
        return [figures(v) for v in value]
    return value


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def differences(a, b, path: str = "") -> list[str]:
    """Paths where ``a`` and ``b`` differ, depth first."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b))
                for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path or '.'}: {a!r} vs {b!r}"[:200]]


def run_twice(argv: list[str]) -> tuple[dict, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        runs = []
        for k in (1, 2):
            print(f"run {k}:", " ".join(argv), flush=True)
            subprocess.run([*argv, "--json", str(out)], check=True, stdout=subprocess.DEVNULL)
            runs.append(json.loads(out.read_text()))
    return runs[0], runs[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the verdict here as JSON")
    ap.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the bench's command")
    args = ap.parse_args()
    argv = args.bench[1:] if args.bench[:1] == ["--"] else args.bench
    if not argv:
        sys.exit("repeat: expected a bench command after --")
    a, b = (figures(r) for r in run_twice(argv))
    diff = differences(a, b)
    res = {"command": " ".join(argv), "identical": not diff, "digests": [digest(a), digest(b)],
           "code": a.get("code"), "threads": a.get("threads"), "differences": diff[:20]}
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    sys.exit(0 if not diff else 1)


if __name__ == "__main__":
    main()
