"""The fedge wheel a bundle carries, built from the installed fedge without network or pip.

fedge is pure Python, so its wheel is its four packages plus a dist-info taken from
the installed distribution's metadata (the same name, version, dependencies and
``fedge`` entry point). This works from an editable checkout and from an installed
wheel alike. Zip entries get a fixed timestamp so the same code gives the same bytes.
"""
from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import zipfile
from pathlib import Path

from toolkit.errors import UsageError

PACKAGES = ("toolkit", "exporters", "device_runtime", "broker_server")
_EPOCH = (2020, 1, 1, 0, 0, 0)  # zip cannot store times before 1980
_WHEEL = "Wheel-Version: 1.0\nGenerator: fedge\nRoot-Is-Purelib: true\nTag: py3-none-any\n"


def fedge_version() -> str:
    return _distribution().version


def device_requirements() -> list[str]:
    """fedge's own dependencies (what a device installs), markers kept."""
    return [r for r in _distribution().requires or [] if "extra ==" not in r]


def build_wheel(out_dir: str | Path) -> Path:
    """Write ``fedge-<version>-py3-none-any.whl`` into ``out_dir``; returns its path."""
    dist = _distribution()
    name = f"fedge-{dist.version}"
    path = Path(out_dir) / f"{name}-py3-none-any.whl"
    entries = _package_files()
    info = f"{name}.dist-info"
    # A checkout on sys.path finds its fedge.egg-info (PKG-INFO) before site-packages.
    metadata = dist.read_text("METADATA") or dist.read_text("PKG-INFO")
    if not metadata:
        raise UsageError("fedge's installed metadata has no METADATA; reinstall fedge")
    meta = {f"{info}/METADATA": metadata.encode(),
            f"{info}/WHEEL": _WHEEL.encode(),
            f"{info}/entry_points.txt": (dist.read_text("entry_points.txt") or "").encode(),
            f"{info}/top_level.txt": "\n".join(PACKAGES).encode() + b"\n"}
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for arcname, data in [*((a, f.read_bytes()) for a, f in entries), *meta.items()]:
            _write(zf, arcname, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
            record.append(f"{arcname},sha256={digest.decode()},{len(data)}")
        record.append(f"{info}/RECORD,,")
        _write(zf, f"{info}/RECORD", ("\n".join(record) + "\n").encode())
    return path


def _distribution() -> importlib.metadata.Distribution:
    try:
        return importlib.metadata.distribution("fedge")
    except importlib.metadata.PackageNotFoundError:
        raise UsageError("fedge is not installed as a package (run `pip install -e .` in "
                         "the checkout), so its wheel cannot be built") from None


def _package_files() -> list[tuple[str, Path]]:
    files = []
    for pkg in PACKAGES:
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"package {pkg} is not importable; cannot build the fedge wheel")
        root = Path(list(spec.submodule_search_locations)[0])
        for f in sorted(root.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc":
                files.append((f"{pkg}/{f.relative_to(root).as_posix()}", f))
    return files


def _write(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    zi = zipfile.ZipInfo(arcname, _EPOCH)
    zi.external_attr = 0o644 << 16
    zi.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(zi, data)
