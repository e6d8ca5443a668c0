"""Hash pins for the third-party wheels a bundle installs: its ``requirements.lock``.

pip's hash-checking mode (``--require-hashes``) wants every package it installs pinned
with ``==`` and its sha256, and pip 23 takes no hashes from a constraints file, so the
lock lists exactly what a device installs: fedge's device requirements (and torch when
the device trains), followed through each wheel's ``Requires-Dist``. The wheelhouse was
downloaded for the device's platform (``fedge wheelhouse --target``), so a conditional
dependency (one with an environment marker) that has no wheel in it is one the target
does not need and is left out; an unconditional one that is missing is an error here.
If that guess is ever wrong, pip refuses the install; it never installs an unpinned
package.
"""
from __future__ import annotations

import re
import zipfile
from email.parser import HeaderParser
from pathlib import Path

from device_runtime.manifest import sha256_file
from toolkit.errors import UsageError

_NAME = re.compile(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"\bextra\s*==")


def normalize(name: str) -> str:
    """PEP 503: ``Paho_MQTT`` and ``paho-mqtt`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock(folder: Path, roots: list[str]) -> tuple[str, int]:
    """The lock text for ``roots`` (requirement strings) from the wheels in ``folder``,
    and how many projects it pins."""
    wheels = _wheels(folder)
    pinned: dict[str, tuple[str, list[Path]]] = {}
    todo = [(r, "fedge") for r in roots]
    while todo:
        req, wanted_by = todo.pop()
        m = _NAME.match(req)
        if m is None:
            raise UsageError(f"{wanted_by} requires {req!r}: not a requirement")
        name = normalize(m.group(1))
        marker = req.partition(";")[2]
        if name in pinned or _EXTRA.search(marker):
            continue
        if name not in wheels:
            if marker.strip():
                continue  # conditional, and the target's wheelhouse did not need it
            raise UsageError(f"wheels {folder}: no wheel for {m.group(1)}, which {wanted_by} "
                             "requires; make it with `fedge wheelhouse --target ...`")
        versions = wheels[name]
        if len(versions) > 1:
            raise UsageError(f"wheels {folder}: {m.group(1)} in {len(versions)} versions "
                             f"({', '.join(sorted(versions))}); expected one to pin")
        version, files = next(iter(versions.items()))
        pinned[name] = (version, files)
        todo.extend((r, m.group(1)) for r in _requires(files[0]))
    lines = []
    for name, (version, files) in sorted(pinned.items()):
        hashes = " ".join(f"--hash=sha256:{sha256_file(f)}" for f in sorted(files))
        lines.append(f"{name}=={version} {hashes}")
    return "\n".join(lines) + "\n", len(pinned)


def _wheels(folder: Path) -> dict[str, dict[str, list[Path]]]:
    """Project -> version -> its wheel files (one per platform tag), fedge's own left out."""
    out: dict[str, dict[str, list[Path]]] = {}
    for f in sorted(folder.glob("*.whl")):
        parts = f.name[:-4].split("-")
        if len(parts) not in (5, 6):
            raise UsageError(f"wheels {folder}: {f.name} is not a wheel file name "
                             "(name-version[-build]-python-abi-platform.whl)")
        name = normalize(parts[0])
        if name != "fedge":
            out.setdefault(name, {}).setdefault(parts[1], []).append(f)
    return out


def _requires(wheel: Path) -> list[str]:
    """The ``Requires-Dist`` lines of a wheel's METADATA."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            meta = [n for n in zf.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA")]
            if len(meta) != 1:
                raise UsageError(f"wheel {wheel}: expected one .dist-info/METADATA, "
                                 f"got {len(meta)}")
            text = zf.read(meta[0]).decode("utf-8")
    except (zipfile.BadZipFile, OSError, UnicodeDecodeError) as e:
        raise UsageError(f"wheel {wheel}: cannot read its metadata ({e})") from None
    return HeaderParser().parsestr(text).get_all("Requires-Dist") or []
