"""How many threads a fedge process gives torch and onnxruntime.

torch's intra-op pool and onnxruntime's default both take every core of the machine,
in every process: eight device agents and an aggregator on a 2-core box then run
eighteen busy threads, and a pre-training sharing the box with them took minutes
instead of seconds. Each process fedge starts therefore sizes its pools from the
cores it may really use (its CPU affinity and the cgroup's CPU quota, v2 or v1),
divided among the sibling processes started with it.

Sizing alone is not enough: the OpenMP runtime under torch's pool spins at every
barrier waiting for its sibling threads, and when another process holds the other
core the sibling is descheduled and the spinning never ends early. A 5-epoch
pre-training with 2 threads beside a busy process took 131 s of wall and 128 s of
CPU time against 7.4 s with one thread (docs/results/threads.md); with
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep at a barrier instead) 11 s. ``configure``
and ``child_env`` therefore set the passive policy unless the user chose one.

``FEDGE_THREADS`` (the one documented override) wins; an explicit
``OMP_NUM_THREADS`` from the user is respected next. ``configure()`` runs before
torch is imported and sets ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, which torch reads
when it starts its pool and which children inherit; ``child_env`` gives each of
``siblings`` child processes its share. ``one_blas_thread`` keeps numpy's OpenBLAS
from starting a pool in a process whose numpy computes nothing worth one (``fedge
infer``). Torch-free.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError

ENV = "FEDGE_THREADS"
_POOL_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Read by libgomp (torch's OpenMP) and Intel's runtime when they load: sleep, not spin.
_WAIT_POLICY = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}
# OpenBLAS reads these before OMP_NUM_THREADS; a user who set one has chosen.
_BLAS_VARS = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")
_CGROUP = Path("/sys/fs/cgroup")


class ThreadsError(DeviceRuntimeError):
    exit_code = EXIT_USAGE


def _quota_v2(root: Path) -> float | None:
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _quota_v1(root: Path) -> float | None:
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def available_cpus(cgroup: Path = _CGROUP) -> int:
    """The cores this process may use: its affinity, capped by a cgroup CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _quota_v2(cgroup)
    if quota is None:
        quota = _quota_v1(cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return max(1, cpus)


def _override(env: dict[str, str]) -> int | None:
    """FEDGE_THREADS, checked: a bad value is a one-line error, not a silent default."""
    text = env.get(ENV, "").strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ThreadsError(f"{ENV}: expected a whole number >= 1, got {text!r}")
    return int(text)


def budget(siblings: int = 1, env: dict[str, str] | None = None,
           cgroup: Path = _CGROUP) -> int:
    """Threads for one of ``siblings`` processes sharing this process's cores."""
    env = os.environ if env is None else env
    forced = _override(env)
    if forced is not None:
        return forced
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp)
    return max(1, available_cpus(cgroup) // max(1, siblings))


def configure(env: dict[str, str] | None = None) -> int:
    """Size this process's pools (before torch is imported); returns the thread count."""
    env = os.environ if env is None else env
    n = budget(1, env)
    for var in _POOL_VARS:
        env[var] = str(n)
    passive(env)
    return n


def passive(env: dict[str, str]) -> None:
    """Threads that wait sleep instead of spinning (see the module's docstring), unless
    the user set the policy; only effective before torch is imported."""
    for var, value in _WAIT_POLICY.items():
        if not env.get(var, "").strip():
            env[var] = value


def one_blas_thread(env: dict[str, str] | None = None) -> bool:
    """Give numpy's OpenBLAS one thread, in a process where numpy does no BLAS work
    (``fedge infer``: ONNX Runtime computes, numpy only checks and counts). OpenBLAS
    starts a thread per core when numpy is imported, and they spin waiting for work:
    on a 2-core machine that cost ``fedge infer`` of one sample about 65 ms of CPU and
    of wall time out of 0.37 s (docs/results/startup.md).

    Only before numpy is imported (after it, the pool exists, and an in-process caller's
    numpy is not this function's to change) and only if the user set neither of
    OpenBLAS's own variables; returns whether it set ``OPENBLAS_NUM_THREADS``. Child
    processes would inherit it: call it only where none that computes is started."""
    env = os.environ if env is None else env
    if "numpy" in sys.modules or any(env.get(v, "").strip() for v in _BLAS_VARS):
        return False
    env["OPENBLAS_NUM_THREADS"] = "1"
    return True


def forced(env: dict[str, str] | None = None) -> bool:
    """Whether the user set ``FEDGE_THREADS`` (then every pool takes that many)."""
    return _override(os.environ if env is None else env) is not None


def child_env(siblings: int, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for one of ``siblings`` child processes started together: each
    gets its share of this process's cores (at least one thread)."""
    env = dict(os.environ if base is None else base)
    share = _override(env) or max(1, available_cpus() // max(1, siblings))
    env[ENV] = str(share)
    for var in _POOL_VARS:
        env[var] = str(share)
    passive(env)
    return env


def pin_torch_threads(n: int) -> int:
    """Give the calling thread ``n`` torch intra-op threads for good; returns the count.

    torch fixes a thread's count at its first parallel operation, from the last
    ``set_num_threads`` made by *any* thread: a thread that sets ``n`` but computes
    only after another thread set 1 (a simulated device agent) computes with 1. Reading
    the count back at once fixes it at ``n`` while no other thread has had a say."""
    import torch

    torch.set_num_threads(n)
    return torch.get_num_threads()


def set_torch_threads(n: int) -> None:
    """Size an already imported torch's pools (the intra-op pool only resizes; the
    inter-op pool can be set once, before any parallel work, so a later call skips it)."""
    import torch

    torch.set_num_threads(n)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
