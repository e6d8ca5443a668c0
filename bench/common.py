"""What every benchmark shares: the machine line, the command line, the code version and
the thread settings, writing results (every JSON records the code it ran, ``code``, and
the threads it ran with, ``threads``: a simulation's figures are reproducible for one
code version and one thread count on one machine, docs/results/reproducibility.md)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Callable


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores"


def cpu_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of every CPU so far, from /proc/stat (None elsewhere): the
    time a hypervisor gave this machine's vCPUs to others, beside all of it."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return ticks[7], sum(ticks)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None
                ) -> float | None:
    """The share of CPU time stolen by the hypervisor between two ``cpu_ticks``."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return round((after[0] - before[0]) / (after[1] - before[1]), 3)


def command(script: str) -> str:
    return " ".join(["python", script, *sys.argv[1:]])


def code_version() -> str:
    """The commit the bench ran (``+dirty`` with uncommitted changes to tracked files);
    ``unknown`` outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# As the bench imported its code (this module comes first): a file edited while a long
# bench runs does not make its record say "+dirty" when the code it ran was clean.
_STARTED = code_version()


def started_code() -> str:
    """``code_version()`` as this bench started."""
    return _STARTED


def threads_arg(ap: argparse.ArgumentParser) -> None:
    """``--threads``, for a bench that runs simulations in its own process(es)."""
    ap.add_argument("--threads", type=int, help="torch threads of each simulation's server "
                    "side (default: FEDGE_THREADS, else the cores this process may use); "
                    "its figures are reproducible for a given count")


def use_threads(n: int | None) -> int:
    """Every simulation this process (and the workers it starts) runs takes ``n``
    threads (None: the budget as it stands); returns the count."""
    from device_runtime import threads

    if n is not None:
        if n < 1:
            sys.exit(f"--threads: expected >= 1, got {n}")
        os.environ[threads.ENV] = str(n)  # what run_simulation's budget() reads
    return threads.budget()


def passive_waits() -> None:
    """Threads waiting at an OpenMP barrier sleep instead of spinning, as in every fedge
    command (device_runtime/threads.py); effective only before torch loads. A simulation's
    server side uses every core beside its device threads: spinning, a REFT arm took 6x
    the wall time (3 rounds at a load of 10: 82 s against 14 s), with the same figures."""
    from device_runtime import threads

    threads.passive(os.environ)


def thread_settings() -> dict:
    """What a simulation's thread count came from: the budget (``FEDGE_THREADS``, else
    ``OMP_NUM_THREADS``, else the cores this process may use), the variables, and torch's
    count in this thread if torch is loaded (a simulation pins it to the budget)."""
    from device_runtime import threads

    out: dict = {"budget": threads.budget(), "cpus": threads.available_cpus()}
    out.update({k: os.environ.get(k) for k in (threads.ENV, "OMP_NUM_THREADS",
                                              "MKL_NUM_THREADS", "OMP_WAIT_POLICY")})
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    return out


def provenance(parts: list[dict]) -> dict:
    """``code`` and ``threads`` for results joined from several runs' results: a list of
    each one's (flattened: a part may be a join itself), so a join of runs of different
    code or thread counts shows it."""
    def entries(v):
        return v if isinstance(v, list) else ["unrecorded" if v is None else v]
    return {k: [e for p in parts for e in entries(p.get(k))] for k in ("code", "threads")}


def this_run() -> dict:
    """``code`` and ``threads`` of this process, as ``provenance`` takes them."""
    return {"code": _STARTED, "threads": thread_settings()}


def write_results(res: dict, json_path: str, md_path: str | None,
                  to_markdown: Callable[[dict], str]) -> None:
    """JSON always (with the code version and thread settings), the markdown table when
    asked; the table is printed too."""
    res.setdefault("code", _STARTED)
    res.setdefault("threads", thread_settings())
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(res, indent=1))
    table = to_markdown(res)
    if md_path:
        Path(md_path).write_text(table)
    print(table)
