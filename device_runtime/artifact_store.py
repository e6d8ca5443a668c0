"""A device's installed exports: one folder per version, a ``current`` pointer swapped
atomically, the previous version kept.

Layout under the store's root (``$FEDGE_HOME/models/<job>/<device>`` unless
``--models-dir``)::

    v3/manifest.json, v3/manifest.json.sig, v3/<artifact paths>   one per version
    current -> v3       the version the device runs (a symlink)
    previous -> v2      the one before, kept for a rollback
    rollout.json        the newest rollout command taken (its ``issued`` time)

A new version is written into a temporary folder, each file fsynced, the folder
renamed to ``v<N>`` and the parent fsynced; only then is ``current`` replaced, by
renaming a new symlink over it (``os.replace``: atomic on POSIX). A crash at any
point leaves ``current`` naming a complete folder. Versions other than current and
previous are removed after a switch.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from device_runtime.errors import ExportRefusedError
from device_runtime.manifest import load_manifest
from device_runtime.signing import signature_path

STATE = "rollout.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _pointer(self, name: str) -> int | None:
        link = self.root / name
        if not link.is_symlink():
            return None
        target = os.readlink(link)
        return int(target[1:]) if target.startswith("v") and target[1:].isdigit() else None

    @property
    def current(self) -> int | None:
        """The version the device runs (None: none installed)."""
        return self._pointer("current")

    @property
    def previous(self) -> int | None:
        return self._pointer("previous")

    def folder(self, version: int) -> Path:
        return self.root / f"v{version}"

    def staging(self) -> Path:
        """A new, empty temporary folder in the store (same file system: rename works)."""
        path = self.root / f".tmp-{secrets.token_hex(4)}"
        path.mkdir(parents=True, mode=0o700)
        return path

    def write(self, folder: Path, files: dict[str, bytes]) -> None:
        """Write ``files`` (path relative to ``folder`` -> bytes), each fsynced."""
        for rel, data in files.items():
            path = folder / rel
            if folder.resolve() not in path.resolve().parents:
                raise ExportRefusedError(f"artifact path {rel!r}: outside its folder")
            _write(path, data)

    def commit(self, staged: Path, version: int) -> Path:
        """Rename the staged folder to ``v<version>`` (replacing an older copy)."""
        final = self.folder(version)
        _fsync_dir(staged)
        if final.exists():
            trash = self.root / f".old-{secrets.token_hex(4)}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staged, final)
        _fsync_dir(self.root)
        return final

    def switch(self, version: int) -> None:
        """Point ``current`` at ``v<version>`` (the old current becomes ``previous``)."""
        if not (self.folder(version) / "manifest.json").is_file():
            raise ExportRefusedError(f"{self.folder(version)}: no installed version {version}")
        old = self.current
        if old == version:
            return
        if old is not None:
            self._link("previous", old)
        self._link("current", version)
        self.prune()

    def _link(self, name: str, version: int) -> None:
        tmp = self.root / f".{name}-{secrets.token_hex(4)}"
        os.symlink(f"v{version}", tmp)
        os.replace(tmp, self.root / name)
        _fsync_dir(self.root)

    def prune(self) -> None:
        keep = {f"v{v}" for v in (self.current, self.previous) if v is not None}
        for p in self.root.iterdir():
            if (p.name.startswith("v") and p.name not in keep) or p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)

    def newest(self, manifest: str | Path) -> Path:
        """What the device runs: the export it was started with (``manifest``), unless a
        rollout has installed a newer version since (then the store's current)."""
        if self.current is None or not (self.root / STATE).exists():
            return Path(manifest)  # no rollout ever reached this store
        given = load_manifest(manifest).version or 0  # its signature is checked next
        return Path(manifest) if given >= self.current else self.folder(self.current)

    def adopt(self, manifest: str | Path, profile: str) -> None:
        """Install the (checked) export the device runs if the store lacks its version."""
        try:
            self._adopt(manifest, profile)
        except OSError as e:
            raise ExportRefusedError(f"model store {self.root}: cannot install "
                                     f"({e.strerror or e})") from None

    def _adopt(self, manifest: str | Path, profile: str) -> None:
        m = load_manifest(manifest)
        if self.current == (m.version or 0):
            return
        src = m.root / "manifest.json"
        files = {"manifest.json": src.read_bytes(),
                 "manifest.json.sig": signature_path(src).read_bytes()}
        for a in m.device(profile).artifacts:
            files[a.path] = m.read_verified(a)
        staged = self.staging()
        self.write(staged, files)
        self.commit(staged, m.version or 0)
        self.switch(m.version or 0)

    # --- the newest command taken (replays are refused) -----------------------------
    def issued(self) -> float:
        try:
            return float(json.loads((self.root / STATE).read_text())["issued"])
        except (OSError, ValueError, KeyError, TypeError):
            return 0.0

    def take(self, issued: float) -> None:
        tmp = self.root / f".{STATE}.tmp"
        _write(tmp, json.dumps({"issued": issued}).encode())
        os.replace(tmp, self.root / STATE)
