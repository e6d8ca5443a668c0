"""Benchmark the reassembler under a chunk flood: cost per chunk and memory per message.

A flood is what the field test sent: one-byte chunks, each the first of a
two-chunk message that never completes, each from another sender (topic
``fedge/job/round/1/update/f<i>``). With N such messages already held, the cost
of one more chunk is timed as the transport pays it (old: ``add`` then
``expire``; new: ``add``, which expires too), median over ``--repeats`` batches
of ``--batch`` chunks. Memory per held message is measured with tracemalloc
beside what the reassembler counts (old ``pending_bytes``, new ``held_bytes``).

The old code is the reassembler of commit 95ffc1f, loaded as a module from
``git show`` and run side by side with today's; nothing of it is reimplemented.

    python bench/chunk_flood.py --json docs/results/chunk_flood.json \\
        --md docs/results/chunking.md
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import command, machine, write_results  # noqa: E402
from device_runtime import chunking  # noqa: E402
from testkit.chunk_flood import flood_chunks, traced_bytes  # noqa: E402

OLD_COMMIT = "95ffc1f"
ROOT = Path(__file__).resolve().parents[1]


def old_module() -> types.ModuleType:
    """device_runtime/chunking.py as it was at OLD_COMMIT, imported under another name."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:device_runtime/chunking.py"], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    mod = sys.modules["chunking_old"] = types.ModuleType("chunking_old")  # dataclasses look
    exec(compile(src, f"{OLD_COMMIT}:device_runtime/chunking.py", "exec"), mod.__dict__)
    return mod


class Arm:
    """One reassembler and how the transport of its time handled a chunk."""

    def __init__(self, name: str, make: Callable[[], object], per_chunk: Callable, held: str):
        self.name, self.make, self.per_chunk, self.held = name, make, per_chunk, held


def arms() -> list[Arm]:
    old = old_module()

    def old_chunk(r, topic: str, data: bytes) -> None:
        r.add(data)
        r.expire()

    return [Arm("old", lambda: old.Reassembler(timeout_s=3600, max_pending_bytes=1 << 40),
                old_chunk, "pending_bytes"),
            Arm("new", lambda: chunking.Reassembler(chunking.ReassemblyLimits(ttl=3600)),
                lambda r, topic, data: r.add(data, topic), "held_bytes")]


def held_per_message(arm: Arm, n: int) -> dict:
    """Bytes per held flood message: tracemalloc's measure and the reassembler's count."""
    r = arm.make()
    items = flood_chunks(n + 1)
    arm.per_chunk(r, *items[0])  # first-use allocations (json's scanner) out of the measure

    def hold() -> None:
        for topic, data in items[1:]:
            arm.per_chunk(r, topic, data)

    actual = traced_bytes(hold)
    counted = getattr(r, arm.held)
    return {"messages": n, "measured_bytes_per_message": round(actual / n, 1),
            "counted_bytes_per_message": round(counted / (n + 1), 1)}


def cost_per_chunk(arm: Arm, levels: list[int], batch: int, repeats: int) -> dict:
    """Median µs per chunk with N messages held, for each N in ``levels`` (ascending)."""
    r, held, out = arm.make(), 0, {}
    for level in levels:
        for topic, data in flood_chunks(level - held, held):
            arm.per_chunk(r, topic, data)
        held = level
        runs = []
        for _ in range(repeats):
            items = flood_chunks(batch, held)
            t0 = time.perf_counter()
            for topic, data in items:
                arm.per_chunk(r, topic, data)
            runs.append((time.perf_counter() - t0) / batch * 1e6)
            held += batch
        out[str(level)] = {"us_per_chunk": round(statistics.median(runs), 2),
                           "runs": [round(x, 2) for x in runs]}
    return out


def to_markdown(res: dict) -> str:
    levels = res["levels"]
    rows = ["| code | " + " | ".join(f"µs per chunk at {n:,} held" for n in levels)
            + " | bytes per held message, measured | bytes per held message, counted |",
            "|---" * (len(levels) + 3) + "|"]
    for name, arm in res["arms"].items():
        cost = " | ".join(f"{arm['cost'][str(n)]['us_per_chunk']:,}" for n in levels)
        mem = arm["memory"]
        rows.append(f"| {name} | {cost} | {mem['measured_bytes_per_message']:,} | "
                    f"{mem['counted_bytes_per_message']:,} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1000,6000,30000", help="messages held (ascending)")
    ap.add_argument("--batch", type=int, default=200, help="chunks timed per run")
    ap.add_argument("--repeats", type=int, default=5, help="runs per level (median)")
    ap.add_argument("--memory-messages", type=int, default=2000)
    ap.add_argument("--json", default="runs/chunk_flood.json")
    ap.add_argument("--md", default=None)
    a = ap.parse_args()
    levels = sorted(int(x) for x in a.levels.split(","))
    res: dict = {"machine": machine(), "command": command("bench/chunk_flood.py"),
                 "python": sys.version.split()[0], "old_commit": OLD_COMMIT,
                 "levels": levels, "batch": a.batch, "repeats": a.repeats, "arms": {}}
    for arm in arms():
        res["arms"][arm.name] = {"memory": held_per_message(arm, a.memory_messages),
                                 "cost": cost_per_chunk(arm, levels, a.batch, a.repeats)}
        print(arm.name, res["arms"][arm.name], flush=True)
    write_results(res, a.json, a.md, to_markdown)


if __name__ == "__main__":
    main()
