"""The arm64 test bed: a Debian bookworm arm64 root run through qemu-user.

``tools/arm64/build_root.sh`` builds the root (and the rpi-bookworm wheelhouse) once
and caches both; this module finds them, says why they cannot be used, and runs
commands inside the root with ``tools/arm64/chroot.sh`` (a private mount namespace,
so nothing stays mounted). Inside, the host's folders given as ``binds`` appear at
the same path, so a path the test knows is the path the device sees.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from testkit import ROOT

TOOLS = ROOT / "tools" / "arm64"
ROOT_DIR = Path(os.environ.get("FEDGE_ARM64_ROOT", "/var/cache/fedge/arm64-bookworm"))
WHEELS = Path(os.environ.get("FEDGE_ARM64_WHEELHOUSE",
                             "/var/cache/fedge/wheelhouse-rpi-bookworm"))
BUILD_HINT = ("build it once with `sudo tools/arm64/build_root.sh` (Debian mirror and "
              "PyPI needed; about 20 min under emulation on 2 cores)")
# What a device has: a clean environment, no pip config pointing at local indexes.
DEVICE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              "HOME=/root", "LANG=C.UTF-8", "PIP_CONFIG_FILE=/dev/null",
              "PYTHONUNBUFFERED=1", "PYTHONFAULTHANDLER=1"]


@dataclass(frozen=True)
class Bed:
    """A usable root and wheelhouse."""

    root: Path
    wheels: Path

    def argv(self, cmd: list[str], binds: list[Path], env: list[str] = ()) -> list[str]:
        """The host command that runs ``cmd`` in the root, ``binds`` mounted at their
        own paths, with the device environment plus ``env``."""
        opts = [a for b in binds for a in ("--bind", f"{b}:{b}")]
        return [str(TOOLS / "chroot.sh"), *opts, "--", "/usr/bin/env", "-i", *DEVICE_ENV,
                *env, *cmd]

    def run(self, cmd: list[str], binds: list[Path], timeout: float,
            env: list[str] = ()) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(cmd, binds, env), capture_output=True, text=True,
                              timeout=timeout, env=_host_env(self))

    def popen(self, cmd: list[str], binds: list[Path], log: Path,
              env: list[str] = ()) -> subprocess.Popen:
        return subprocess.Popen(self.argv(cmd, binds, env), stdout=open(log, "wb"),
                                stderr=subprocess.STDOUT, env=_host_env(self))


def _host_env(bed: Bed) -> dict:
    return dict(os.environ, FEDGE_ARM64_ROOT=str(bed.root))


OPT_IN = "FEDGE_ARM64"


def unusable() -> str | None:
    """Why the bed cannot be used here (a skip reason), or None. Opt-in: under emulation
    the module takes 30+ minutes on 2 shared cores (docs/results/arm64.md), more than
    CI's budget leaves, so CI runs it only where FEDGE_ARM64=1 is set."""
    if os.environ.get(OPT_IN) != "1":
        return (f"arm64 bed: opt-in, set {OPT_IN}=1 (30+ min under emulation; needs the "
                "cached root, see docs/deploy.md#an-arm64-test-bed)")
    if os.uname().machine not in ("x86_64", "aarch64"):
        return f"arm64 bed: host {os.uname().machine} is neither x86_64 nor aarch64"
    if os.geteuid() != 0:
        return "arm64 bed: needs root (chroot, mounts, binfmt_misc)"
    p = subprocess.run([str(TOOLS / "binfmt.sh")], capture_output=True, text=True)
    if p.returncode != 0:
        return f"arm64 bed: aarch64 binaries cannot run here: {p.stderr.strip()}"
    if not (ROOT_DIR / ".fedge-root-ready").is_file():
        return f"arm64 bed: no cached root at {ROOT_DIR}: {BUILD_HINT}"
    if not any(WHEELS.glob("torch-*.whl")):
        return f"arm64 bed: no rpi-bookworm wheelhouse with torch at {WHEELS}: {BUILD_HINT}"
    return None


def du_bytes(path: Path) -> int:
    """Disk use of a folder, as `du -sb` counts it (apparent size)."""
    return int(subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
