"""The export manifest, as a device reads it: schema checks and artifact verification.

``manifest.json`` (format ``fedge-manifest/2``) carries the export's ``version``
(an integer that grows with every export) and the ``job`` it was made for (or
null), and lists per device profile the artifacts exported for it, each with its
sha256. A device loads nothing whose bytes do not match, and hashes the very
bytes it then loads (``read_verified``). An fp32 artifact may carry an
``int8_fallback`` record (why no int8 copy met its parity bounds, with the
measured agreement): it then serves requests for int8 too (``DeviceEntry.serving``).
The exporters write this format; this
module is the one reader, so a device needs neither torch nor the exporters to
use it. With a trusted public key, ``load_manifest`` checks the manifest's
Ed25519 signature (``device_runtime.signing``) on the bytes it read before it
parses them, and refuses an unversioned ``fedge-manifest/1``; which versions
and jobs a device accepts is ``device_runtime.rollback``'s business.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from device_runtime.digest import sha256_hex, sha256_stream
from device_runtime.errors import ArtifactVerificationError, ExportRefusedError, ManifestError
from device_runtime.signing import verify_bytes

FORMAT = "fedge-manifest/2"
FORMAT_V1 = "fedge-manifest/1"  # no version, no job: read only without a trusted key
ROLES = ("full", "head", "tail", "base")
PRECISIONS = ("fp32", "int8")
FORMATS = ("onnx", "ort", "pte")  # pte: ExecuTorch, for phone apps (no Python runtime)


def sha256_file(path: str | Path) -> str:
    with open(path, "rb") as f:
        return sha256_stream(f)


@dataclass(frozen=True)
class Artifact:
    role: str
    index: int | None
    precision: str
    format: str
    path: str
    sha256: str
    opset: int
    params: int
    macs: int
    inputs: list
    outputs: list
    parity: dict
    int8_fallback: dict | None = None  # fp32 shipped in the int8 slot: why, measured

    @classmethod
    def from_json(cls, d: object, where: str) -> "Artifact":
        if not isinstance(d, dict):
            raise ManifestError(f"{where}: expected an object, got {type(d).__name__}")
        _expect(d, where, "role", str, ROLES)
        _expect(d, where, "precision", str, PRECISIONS)
        _expect(d, where, "format", str, FORMATS)
        _expect(d, where, "path", str)
        _expect(d, where, "sha256", str)
        for key in ("opset", "params", "macs"):
            _expect(d, where, key, int)
        for key in ("inputs", "outputs"):
            _expect(d, where, key, list)
        if d.get("index") is not None and not isinstance(d["index"], int):
            raise ManifestError(f"{where}.index: expected int or null, got {d['index']!r}")
        if Path(d["path"]).is_absolute() or ".." in Path(d["path"]).parts:
            raise ManifestError(f"{where}.path: expected a path inside the manifest's "
                                f"folder, got {d['path']!r}")
        fallback = d.get("int8_fallback")
        if fallback is not None and (not isinstance(fallback, dict)
                                     or d["precision"] != "fp32"):
            raise ManifestError(f"{where}.int8_fallback: expected an object on an fp32 "
                                f"artifact or null, got {fallback!r} on {d['precision']}")
        return cls(d["role"], d.get("index"), d["precision"], d["format"], d["path"],
                   d["sha256"], d["opset"], d["params"], d["macs"], d["inputs"],
                   d["outputs"], dict(d.get("parity") or {}), fallback)


def _expect(d: dict, where: str, key: str, typ: type, allowed: tuple | None = None) -> None:
    if key not in d:
        raise ManifestError(f"{where}: missing field {key!r}")
    v = d[key]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ManifestError(f"{where}.{key}: expected {typ.__name__}, got {v!r}")
    if allowed is not None and v not in allowed:
        raise ManifestError(f"{where}.{key}: expected one of {', '.join(allowed)}, got {v!r}")


@dataclass(frozen=True)
class DeviceEntry:
    name: str
    profile: dict
    plan: dict
    artifacts: list[Artifact]

    def find(self, role: str = "full", precision: str = "fp32", fmt: str = "onnx",
             index: int | None = None) -> Artifact:
        for a in self.artifacts:
            if (a.role, a.precision, a.format, a.index) == (role, precision, fmt, index):
                return a
        have = ", ".join(f"{a.role}/{a.precision}/{a.format}" for a in self.artifacts)
        raise ManifestError(f"device {self.name}: no {role}/{precision}/{fmt} artifact "
                            f"(has {have})")

    def serving(self, role: str, precision: str, index: int | None = None,
                formats: tuple[str, ...] = ("onnx", "ort")) -> Artifact | None:
        """The artifact that answers a request for ``role``/``precision``/``index``: of that
        precision in the first of ``formats`` listed, else (for int8) the fp32 one that
        records an ``int8_fallback``; None if neither is listed."""
        for want_fallback in (False, True):
            for fmt in formats:
                for a in self.artifacts:
                    if (a.role, a.format, a.index) != (role, fmt, index):
                        continue
                    if not want_fallback and a.precision == precision:
                        return a
                    if want_fallback and precision == "int8" and a.int8_fallback is not None:
                        return a
        return None

    def fallbacks(self) -> list[Artifact]:
        """The fp32 artifacts that stand in for an int8 copy no setting could verify."""
        return [a for a in self.artifacts if a.int8_fallback is not None]


@dataclass(frozen=True)
class Manifest:
    root: Path  # the folder that artifact paths are relative to
    model: dict
    devices: dict[str, DeviceEntry]
    key_id: str | None = None  # the trusted key that verified the signature, if any
    version: int | None = None  # the export's version (None: an unversioned v1 manifest)
    job: str | None = None  # the job it was made for (None: bound to no job)

    def device(self, name: str) -> DeviceEntry:
        if name not in self.devices:
            raise ManifestError(f"manifest has no device {name!r}; "
                                f"has: {', '.join(self.devices)}")
        return self.devices[name]

    def path_of(self, artifact: Artifact) -> Path:
        return self.root / artifact.path

    def verify(self, artifact: Artifact) -> Path:
        """The artifact's path, once its bytes match the manifest's sha256. For a file
        that is then loaded, use ``read_verified``: the path may change after this."""
        path = self._existing(artifact)
        _check_digest(artifact, sha256_file(path))
        return path

    def read_verified(self, artifact: Artifact) -> bytes:
        """The artifact's bytes, read once and checked against the manifest's sha256:
        whoever loads them loads what was hashed, whatever the file becomes later."""
        try:
            data = self._existing(artifact).read_bytes()
        except OSError as e:
            raise ArtifactVerificationError(f"artifact {artifact.path}: cannot read "
                                            f"({e.strerror or e})") from None
        _check_digest(artifact, sha256_hex(data))
        return data

    def _existing(self, artifact: Artifact) -> Path:
        path = self.path_of(artifact)
        if not path.is_file():
            raise ArtifactVerificationError(f"artifact {artifact.path} is missing")
        return path

    def verify_all(self) -> int:
        n = 0
        for entry in self.devices.values():
            for a in entry.artifacts:
                self.verify(a)
                n += 1
        return n


def _check_digest(artifact: Artifact, digest: str) -> None:
    if digest != artifact.sha256:
        raise ArtifactVerificationError(
            f"artifact {artifact.path} fails its sha256 check (manifest "
            f"{artifact.sha256[:12]}..., file {digest[:12]}...)")


def load_manifest(path: str | Path, trust: str | Path | None = None,
                  verified: Path | None = None) -> Manifest:
    """The manifest at ``path`` (a manifest.json or its folder).

    With ``trust`` (a public key file), the signature beside the manifest is
    verified on the bytes read, before any of them is parsed or used; a failure
    raises SignatureError, and an unversioned ``fedge-manifest/1`` raises
    ExportRefusedError. ``verified``: a device's cache of signatures checked before
    (``device_runtime.verified``). Artifacts are verified later, one by one.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"manifest {path} does not exist") from None
    except OSError as e:
        raise ManifestError(f"manifest {path} is not readable: {e.strerror or e}") from None
    key_id = verify_bytes(raw, path, trust, verified) if trust is not None else None
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"manifest {path} is not readable JSON: {e}") from None
    where = f"manifest {path.name}"
    fmt = data.get("format") if isinstance(data, dict) else type(data).__name__
    if fmt == FORMAT_V1 and key_id is not None:
        raise ExportRefusedError(f"manifest {path} is {FORMAT_V1}, which has no version "
                                 f"and no job: a device given --trust refuses an unversioned "
                                 f"export; re-export it with this fedge ({FORMAT})")
    if fmt not in (FORMAT, FORMAT_V1):
        raise ManifestError(f"{where}.format: expected {FORMAT!r}, got {fmt!r}")
    version, job = _binding(data, where) if fmt == FORMAT else (None, None)
    _expect(data, where, "model", dict)
    _expect(data, where, "devices", dict)
    devices = {}
    for name, entry in data["devices"].items():
        w = f"{where}.devices.{name}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{w}: expected an object")
        _expect(entry, w, "artifacts", list)
        arts = [Artifact.from_json(a, f"{w}.artifacts[{i}]")
                for i, a in enumerate(entry["artifacts"])]
        devices[name] = DeviceEntry(name, dict(entry.get("profile") or {}),
                                    dict(entry.get("plan") or {}), arts)
    return Manifest(path.parent, data["model"], devices, key_id, version, job)


def _binding(data: dict, where: str) -> tuple[int, str | None]:
    """The manifest's version (an int >= 1) and job (a non-empty string, or null)."""
    _expect(data, where, "version", int)
    if data["version"] < 1:
        raise ManifestError(f"{where}.version: expected an int >= 1, got {data['version']!r}")
    job = data.get("job")
    if job is not None and (not isinstance(job, str) or not job):
        raise ManifestError(f"{where}.job: expected a job id or null, got {job!r}")
    return data["version"], job
