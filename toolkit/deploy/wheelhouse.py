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
# PyPI's Linux torch wheels (aarch64 too) are CUDA builds that pull ~2.7 GB of NVIDIA
# packages; a Pi wants the CPU build from PyTorch's own index.
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
PYPI = "https://pypi.org/simple"


@dataclass(frozen=True)
class Target:
    """A device platform: what pip must pretend to be to fetch its wheels."""

    name: str
    python: str | None  # "3.11"; None: this machine's
    arch: str | None  # "aarch64"; None: this machine's
    glibc: int  # minor version of glibc 2.x on the device
    note: str

    def platforms(self) -> list[str]:
        """Every manylinux tag the device's glibc runs (pip 23 does not infer older ones)."""
        if self.arch is None:
            return []
        return [f"manylinux_2_{v}_{self.arch}" for v in range(self.glibc, 16, -1)] + \
            [f"manylinux2014_{self.arch}"]


TARGETS = {t.name: t for t in (
    Target("host", None, None, 0, "this machine's platform and Python (tests, x86 gateways)"),
    Target("rpi-bookworm", "3.11", "aarch64", 36,
           "Raspberry Pi OS Bookworm 64-bit (Pi 3B/4/5): aarch64, glibc 2.36, Python 3.11"),
    Target("jetson-jp6", "3.10", "aarch64", 35,
           "Jetson Orin with JetPack 6 (Ubuntu 22.04): aarch64, glibc 2.35, Python 3.10; "
           "CPU onnxruntime (install NVIDIA's onnxruntime-gpu with install.sh --onnxruntime)"),
    Target("jetson-nano-legacy", "3.10", "aarch64", 27,
           "Jetson Nano with JetPack 4.6 (Ubuntu 18.04): aarch64, glibc 2.27, a Python 3.10 "
           "you build (the stock one is 3.6); CPU onnxruntime only"),
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
        runs.append(cmd + ["--index-url", TORCH_INDEX, "--extra-index-url", PYPI, TORCH])
    return runs


def download(name: str, out: str | Path, torch: bool = False) -> list[Path]:
    """Download the wheels for target ``name`` into ``out``; returns the wheel files."""
    t, out = target(name), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for cmd in pip_commands(t, out, torch):
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise UsageError(f"wheelhouse {t.name}: pip download failed: {last}")
    return sorted(out.glob("*.whl"))
