"""Third-party wheels for devices that install offline: ``fedge wheelhouse``.

Field devices often have no route to PyPI, so the server side downloads, once, the
wheels a device's ``install.sh`` needs, for the device's platform and Python, and
ships them in the bundle (``fedge bundle --wheels DIR``) or beside it
(``install.sh --wheelhouse DIR``). The one step here that uses the network.
"""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from toolkit.deploy.wheel import device_requirements
from toolkit.errors import UsageError

TORCH = "torch==2.13.0"  # the version the server trains with
# PyPI's x86_64 torch wheels are CUDA builds that pull ~2.7 GB of NVIDIA packages; an
# x86 device wants the CPU build from PyTorch's own index.
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"
# PyPI's aarch64 torch is a CPU build up to 2.10.0 (every nvidia-* requirement carries
# platform_machine == "x86_64"); from 2.11.0 on it requires cuda-toolkit and nvidia-*
# on aarch64 too. Checked with `pip install --dry-run --report` per version (docs/
# results/arm64.md). The device's torch only trains locally: the wire carries numpy
# tensors named and shaped by the server's plan, checked exactly on both ends, so the
# version may differ from the server's (tests/test_arm64.py runs 2.10 against 2.13).
TORCH_AARCH64 = "torch==2.10.0"
# Wheels that mean a CUDA build came along: a wheelhouse for a CPU device refuses them.
CUDA_PREFIXES = ("nvidia-", "nvidia_", "cuda-", "cuda_", "triton-")


@dataclass(frozen=True)
class Target:
    """A device platform: what pip must pretend to be to fetch its wheels."""

    name: str
    python: str | None  # "3.11"; None: this machine's
    arch: str | None  # "aarch64"; None: this machine's
    glibc: int  # minor version of glibc 2.x on the device
    note: str
    torch: str | None = TORCH  # the CPU torch for the device; None: no such wheel
    torch_index: str | None = TORCH_INDEX  # where it is; None: PyPI

    def platforms(self) -> list[str]:
        """Every manylinux tag the device's glibc runs (pip 23 does not infer older ones)."""
        if self.arch is None:
            return []
        return [f"manylinux_2_{v}_{self.arch}" for v in range(self.glibc, 16, -1)] + \
            [f"manylinux2014_{self.arch}"]


TARGETS = {t.name: t for t in (
    Target("host", None, None, 0, "this machine's platform and Python (tests, x86 gateways)"),
    Target("rpi-bookworm", "3.11", "aarch64", 36,
           "Raspberry Pi OS Bookworm 64-bit (Pi 3B/4/5): aarch64, glibc 2.36, Python 3.11",
           TORCH_AARCH64, None),
    Target("jetson-jp6", "3.10", "aarch64", 35,
           "Jetson Orin with JetPack 6 (Ubuntu 22.04): aarch64, glibc 2.35, Python 3.10; "
           "CPU onnxruntime (install NVIDIA's onnxruntime-gpu with install.sh --onnxruntime)",
           TORCH_AARCH64, None),
    Target("jetson-nano-legacy", "3.10", "aarch64", 27,
           "Jetson Nano with JetPack 4.6 (Ubuntu 18.04): aarch64, glibc 2.27, a Python 3.10 "
           "you build (the stock one is 3.6); CPU onnxruntime only; no PyPI torch runs on "
           "glibc 2.27 (install NVIDIA's wheel with install.sh --torch)", None, None),
)}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise UsageError(f"unknown wheelhouse target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name]


def pip_commands(t: Target, out: Path, torch: bool) -> list[list[str]]:
    """The ``pip download`` runs that fetch every wheel a device install needs."""
    cmd = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "-q",
           "--only-binary=:all:", "-d", str(out)]
    for tag in t.platforms():
        cmd += ["--platform", tag]
    if t.arch:
        cmd += ["--implementation", "cp"]
    if t.python:
        cmd += ["--python-version", t.python]
    runs = [cmd + device_requirements()]
    if torch:
        if t.torch is None:
            raise UsageError(f"wheelhouse {t.name}: --torch: no torch wheel on PyPI runs on "
                             f"glibc 2.{t.glibc}; give the device NVIDIA's with install.sh "
                             "--torch")
        index = [] if t.torch_index is None else \
            ["--index-url", t.torch_index, "--extra-index-url", PYPI]
        # pip evaluates markers for the machine it runs on, not --platform: on x86 it
        # would fetch the aarch64 wheel's `platform_machine == "x86_64"` NVIDIA packages
        # (GBs). So torch alone here, then its dependencies as the target sees them.
        runs.append(cmd + index + (["--no-deps"] if t.arch else []) + [t.torch])
    return runs


def target_requires(wheel: Path, t: Target) -> list[str]:
    """The requirements of ``wheel`` whose markers hold on target ``t`` (extras left
    out), without their markers."""
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    from toolkit.deploy.wheellock import _requires

    env = dict(default_environment(), platform_machine=t.arch, platform_system="Linux",
               sys_platform="linux", os_name="posix", python_version=t.python,
               python_full_version=f"{t.python}.0", platform_python_implementation="CPython",
               implementation_name="cpython", extra="")
    out = []
    for line in _requires(wheel):
        r = Requirement(line)
        if r.marker is None or r.marker.evaluate(env):
            out.append(f"{r.name}{r.specifier}")
    return out


def cuda_wheels(folder: Path) -> list[str]:
    """The wheels in ``folder`` that belong to a CUDA build (none may ship to a CPU
    device: they are GBs, and a Pi cannot use them)."""
    return sorted(w.name for w in folder.glob("*.whl")
                  if w.name.lower().startswith(CUDA_PREFIXES))


def download(name: str, out: str | Path, torch: bool = False) -> list[Path]:
    """Download the wheels for target ``name`` into ``out``; returns the wheel files."""
    t, out = target(name), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = pip_commands(t, out, torch)
    for cmd in runs:
        _pip(t, cmd)
    if torch and t.arch:
        wheel = sorted(out.glob("torch-*.whl"))[-1]
        deps = target_requires(wheel, t)
        if deps:
            _pip(t, runs[0][:-len(device_requirements())] + deps)
    cuda = cuda_wheels(out)
    if cuda:
        raise UsageError(f"wheelhouse {t.name}: CUDA packages came with torch: expected a "
                         f"CPU build, got {', '.join(cuda[:3])} ({len(cuda)} in {out})")
    return sorted(out.glob("*.whl"))


def _pip(t: Target, cmd: list[str]) -> None:
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise UsageError(f"wheelhouse {t.name}: pip download failed: {last}")
