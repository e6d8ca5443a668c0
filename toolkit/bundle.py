"""``fedge bundle``: one tar.gz with everything one device needs to join a job.

Layout inside ``fedge-<id>/``: ``install.sh``, ``fedge-device.service.in``,
``bundle.env`` (what install.sh needs to know), ``requirements.txt``, ``wheels/``
(the fedge wheel, plus third-party wheels with ``--wheels``), ``device.toml`` (the
agent's config), ``profiles.toml`` (the device's profile as the export planned it),
``artifacts/`` (the signed manifest and this device's artifacts only), ``trust.pub``,
and with ``--credentials`` the ``credentials/<id>.json``, ``ca.crt`` and ``certs/``
that `fedge secure init` wrote, in the same relative layout. ``SHA256SUMS`` covers
every file. Everything is checked before anything is written; the archive appears
only when complete.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device_runtime.manifest import sha256_file
from toolkit.errors import UsageError
from toolkit.wheel import build_wheel, device_requirements, fedge_version
from toolkit.wheelhouse import TORCH, TORCH_INDEX

TEMPLATES = Path(__file__).parent / "deploy"
# Strategies whose devices only run an exported head in onnxruntime; every other
# strategy trains on the device, so its bundle installs torch.
INFERENCE_ONLY = frozenset({"ecofed"})


@dataclass(frozen=True)
class BundleOptions:
    manifest: Path
    device: str  # the profile's entry in the manifest
    broker: str
    job: str
    id: str
    out: Path
    strategy: str = "fedavg"
    trust: Path | None = None  # the export's public key; default: the signing key's
    credentials: Path | None = None  # DIR/credentials/<id>.json from `fedge secure init`
    data: Path | None = None  # the device's .npz shard, when it ships with the bundle
    wheels: Path | None = None  # a wheelhouse (`fedge wheelhouse`) to ship too


def make_bundle(o: BundleOptions) -> dict:
    """Write the bundle; returns its summary (files, sizes, whether torch installs)."""
    manifest, entry = _checked(o)
    root = f"fedge-{o.id}"
    with tempfile.TemporaryDirectory(prefix="fedge-bundle-") as tmp:
        stage = Path(tmp) / root
        (stage / "wheels").mkdir(parents=True)
        build_wheel(stage / "wheels")
        if o.wheels is not None:
            for w in sorted(o.wheels.glob("*.whl")):
                if not w.name.startswith("fedge-"):
                    shutil.copy2(w, stage / "wheels" / w.name)
        _copy_artifacts(manifest.root, entry.artifacts, stage / "artifacts")
        shutil.copy2(o.trust, stage / "trust.pub")
        config = _config(o, stage)
        (stage / "device.toml").write_text(config, encoding="utf-8")
        (stage / "profiles.toml").write_text(_profile_toml(o.device, entry.profile))
        needs_torch = o.strategy not in INFERENCE_ONLY
        _write_install_files(stage, o, needs_torch)
        sums = _sha256sums(stage)
        (stage / "SHA256SUMS").write_text(sums, encoding="utf-8")
        tmp_out = o.out.with_name(o.out.name + ".part")
        _tar(stage, root, tmp_out)
        os.replace(tmp_out, o.out)
    third_party = 0 if o.wheels is None else \
        sum(w.stat().st_size for w in o.wheels.glob("*.whl") if not w.name.startswith("fedge-"))
    return {"bundle": str(o.out), "bytes": o.out.stat().st_size, "device": o.id,
            "profile": o.device, "torch": needs_torch, "third_party_wheel_bytes": third_party,
            "files": len(sums.splitlines())}


def _checked(o: BundleOptions):
    """The manifest entry and artifacts to ship, once every input is known good."""
    from device_runtime.credentials import transport_kwargs
    from device_runtime.data import load_shard
    from device_runtime.manifest import load_manifest
    from device_runtime.rollback import ExportPolicy, check_binding
    from device_runtime.topics import check_id
    from device_runtime.transport.url import BrokerURL
    from toolkit.setups import check_strategy

    BrokerURL.parse(o.broker)
    check_id("job", o.job)
    check_id("device", o.id)
    check_strategy(o.strategy)
    if o.trust is None or not o.trust.is_file():
        raise UsageError(f"--trust {o.trust}: no such public key file")
    manifest = load_manifest(o.manifest, trust=o.trust)
    check_binding(manifest, ExportPolicy(o.job), ledger=False)  # the device would refuse it
    entry = manifest.device(o.device)
    for a in entry.artifacts:
        manifest.verify(a)
    if o.data is not None:
        load_shard(o.data)
    if o.credentials is not None:
        transport_kwargs(o.credentials, o.id)  # files exist; the ACL is per username
    if o.wheels is not None and not o.wheels.is_dir():
        raise UsageError(f"--wheels {o.wheels}: no such folder")
    if o.out.exists() and o.out.is_dir():
        raise UsageError(f"--out {o.out}: is a folder, expected a .tar.gz path")
    if not o.out.parent.is_dir():
        raise UsageError(f"--out {o.out}: folder {o.out.parent} does not exist")
    return manifest, entry


def _credential_files(path: Path) -> dict[str, Path]:
    """The files a credentials JSON names, by their path relative to its DIR."""
    from device_runtime.credentials import Credentials

    creds = Credentials.load(path)  # checks the JSON and that every file exists
    root = path.resolve().parent.parent
    files = {f"credentials/{path.name}": path.resolve()}
    for p in (creds.ca, creds.cert, creds.key, creds.signing_key, creds.trust):
        if p:
            files[Path(p).resolve().relative_to(root).as_posix()] = Path(p)
    return files


def _copy_artifacts(src: Path, artifacts, dest: Path) -> None:
    """The signed manifest as it is (re-writing it would break the signature), and
    only this device's artifacts."""
    dest.mkdir(parents=True)
    for name in ("manifest.json", "manifest.json.sig"):
        shutil.copy2(src / name, dest / name)
    for a in artifacts:
        (dest / a.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / a.path, dest / a.path)


def _config(o: BundleOptions, stage: Path) -> str:
    lines = ["# The agent's config: `fedge device --config device.toml` (paths are",
             "# relative to this file).",
             f"broker = {json.dumps(o.broker)}", f"job = {json.dumps(o.job)}",
             f"id = {json.dumps(o.id)}", f"profile = {json.dumps(o.device)}",
             'profiles_file = "profiles.toml"',
             'manifest = "artifacts/manifest.json"', 'trust = "trust.pub"']
    if o.data is not None:
        (stage / "data").mkdir()
        shutil.copy2(o.data, stage / "data" / "local.npz")
        lines.append('data = "data/local.npz"')
    else:
        lines.append("# Put the device's own (x, y) .npz here, or point data elsewhere.")
        lines.append('data = "../var/local.npz"')
    if o.credentials is not None:
        for rel, src in _credential_files(o.credentials).items():
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, stage / rel)
        lines.append(f'credentials = "credentials/{o.credentials.name}"')
    return "\n".join(lines) + "\n"


def _profile_toml(name: str, profile: dict) -> str:
    lines = [f"[profiles.{json.dumps(name)}]"]
    for key, value in profile.items():
        if key == "name" or value is None:
            continue
        v = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f"{key} = {v}")
    return "\n".join(lines) + "\n"


def _write_install_files(stage: Path, o: BundleOptions, needs_torch: bool) -> None:
    for name in ("install.sh", "fedge-device.service.in"):
        shutil.copy2(TEMPLATES / name, stage / name)
    (stage / "install.sh").chmod(0o755)
    env = {"FEDGE_VERSION": fedge_version(), "DEVICE_ID": o.id, "JOB": o.job,
           "UNIT_NAME": "fedge-device", "NEEDS_TORCH": "1" if needs_torch else "0",
           "TORCH_SPEC": TORCH, "TORCH_INDEX": TORCH_INDEX}
    (stage / "bundle.env").write_text("".join(f"{k}='{v}'\n" for k, v in env.items()))
    (stage / "requirements.txt").write_text("\n".join(device_requirements()) + "\n")


def _sha256sums(stage: Path) -> str:
    rows = []
    for f in sorted(p for p in stage.rglob("*") if p.is_file()):
        rows.append(f"{sha256_file(f)}  {f.relative_to(stage).as_posix()}")
    return "\n".join(rows) + "\n"


def _tar(stage: Path, root: str, out: Path) -> None:
    """A reproducible archive: sorted names, fixed owner and time, keys 0600."""
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = 1577836800
        if ti.name.endswith(".key"):
            ti.mode = 0o600
        return ti
    with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tf:
            tf.add(stage, arcname=root, recursive=False, filter=clean)
            for p in sorted(stage.rglob("*")):
                tf.add(p, arcname=f"{root}/{p.relative_to(stage).as_posix()}",
                       recursive=False, filter=clean)
