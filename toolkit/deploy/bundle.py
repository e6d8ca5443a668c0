"""``fedge bundle``: one tar.gz with everything one device needs to join a job.

Layout inside ``fedge-<id>/``: ``install.sh``, ``fedge-device.service.in``,
``bundle.env`` (what install.sh needs to know: KEY=VALUE data, never sourced),
``requirements.txt``, ``requirements.lock`` (with ``--wheels`` or ``--pin-wheels``: every
third-party wheel pinned by sha256, for ``pip --require-hashes``), ``wheels/`` (the fedge
wheel, plus third-party wheels with ``--wheels``), ``device.toml`` (the agent's config),
``profiles.toml`` (the device's profile as the export planned it), ``artifacts/`` (the
signed manifest and this device's artifacts only), ``trust.pub``, and with
``--credentials`` the credentials JSON and every file it names (``ca.crt``, ``certs/``,
...), in the same layout as `fedge secure init` wrote them.

``SHA256SUMS`` lists every file and ``SHA256SUMS.sig`` is its Ed25519 signature (64 raw
bytes, what ``openssl pkeyutl -verify -rawin`` checks) by the operator's signing key,
the one that signs exports; ``trust.pub`` must be that key's public half. install.sh
verifies the signature with a key the device already has before it reads anything
else. Everything is checked before anything is written; the archive (it may hold a
private key) appears, mode 0600, only when complete.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from device_runtime.keys import PublicKey, Signer
from device_runtime.manifest import sha256_file
from toolkit import strategies
from toolkit.deploy.secure import replace_file
from toolkit.deploy.wheel import build_wheel, device_requirements, fedge_version
from toolkit.deploy.wheelhouse import TORCH, TORCH_AARCH64, TORCH_INDEX
from toolkit.deploy.wheellock import lock
from toolkit.errors import UsageError

TEMPLATES = Path(__file__).parent  # install.sh and the unit template, beside this
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
    signing_key: Path | None = None  # signs SHA256SUMS; default $FEDGE_HOME/signing.key
    credentials: Path | None = None  # DIR/credentials/<id>.json from `fedge secure init`
    data: Path | None = None  # the device's .npz shard, when it ships with the bundle
    wheels: Path | None = None  # a wheelhouse (`fedge wheelhouse`) to ship and pin
    pin_wheels: Path | None = None  # a wheelhouse to pin only (install.sh --wheelhouse)


def make_bundle(o: BundleOptions) -> dict:
    """Write the bundle; returns its summary (files, sizes, whether torch installs, the
    signing key's id and fingerprint)."""
    manifest, entry, signer = _checked(o)
    root = f"fedge-{o.id}"
    # A strategy whose devices train installs torch; EcoFed's run a head in onnxruntime.
    needs_torch = strategies.spec(o.strategy).device_trains
    with tempfile.TemporaryDirectory(prefix="fedge-bundle-") as tmp:
        stage = Path(tmp) / root
        (stage / "wheels").mkdir(parents=True)
        build_wheel(stage / "wheels")
        if o.wheels is not None:
            for w in sorted(o.wheels.glob("*.whl")):
                if not w.name.startswith("fedge-"):
                    shutil.copy2(w, stage / "wheels" / w.name)
        _copy_artifacts(manifest.root, entry.artifacts, stage / "artifacts")
        (stage / "trust.pub").write_bytes(signer.public.pem())
        config = _config(o, stage)
        (stage / "device.toml").write_text(config, encoding="utf-8")
        (stage / "profiles.toml").write_text(_profile_toml(o.device, entry.profile))
        pinned = _write_install_files(stage, o, needs_torch)
        sums = _sha256sums(stage)
        (stage / "SHA256SUMS").write_text(sums, encoding="utf-8")
        (stage / "SHA256SUMS.sig").write_bytes(signer.sign(sums.encode("utf-8")))
        # 0600: the archive may hold a private key; atomic: no half-written bundle.
        replace_file(o.out, lambda raw: _tar(stage, root, raw), 0o600)
    third_party = 0 if o.wheels is None else \
        sum(w.stat().st_size for w in o.wheels.glob("*.whl") if not w.name.startswith("fedge-"))
    return {"bundle": str(o.out), "bytes": o.out.stat().st_size, "device": o.id,
            "profile": o.device, "torch": needs_torch, "third_party_wheel_bytes": third_party,
            "pinned_wheels": pinned, "files": len(sums.splitlines()),
            "key_id": signer.key_id, "fingerprint": fingerprint(signer.public)}


def fingerprint(key: PublicKey) -> str:
    """What ``install.sh --fingerprint`` takes: the sha256 of the raw 32-byte public key
    (its first 16 hex digits are the key id)."""
    return hashlib.sha256(key.raw()).hexdigest()


def _checked(o: BundleOptions):
    """The manifest entry and artifacts to ship and the key that signs the bundle, once
    every input is known good."""
    from device_runtime.credentials import transport_kwargs
    from device_runtime.data import load_shard
    from device_runtime.manifest import load_manifest
    from device_runtime.rollback import ExportPolicy, check_binding
    from device_runtime.topics import check_id
    from device_runtime.transport.url import BrokerURL
    from toolkit.deploy.signing import default_key_path, load_key, public_key_path
    from toolkit.strategies.setups import check_strategy

    BrokerURL.parse(o.broker)
    check_id("job", o.job)
    check_id("device", o.id)
    check_strategy(o.strategy)
    key_path = o.signing_key or default_key_path()
    signer = Signer(load_key(key_path).private)
    trust = o.trust or public_key_path(key_path)
    if not trust.is_file():
        raise UsageError(f"--trust {trust}: no such public key file")
    if PublicKey.load(trust).key_id != signer.key_id:
        raise UsageError(f"--trust {trust} is key {PublicKey.load(trust).key_id}, but the "
                         f"bundle is signed with key {signer.key_id} (--signing-key): a device "
                         "checks the bundle and the export with one key")
    manifest = load_manifest(o.manifest, trust=trust)
    check_binding(manifest, ExportPolicy(o.job), ledger=False)  # the device would refuse it
    entry = manifest.device(o.device)
    for a in entry.artifacts:
        manifest.verify(a)
    if o.data is not None:
        load_shard(o.data)
    if o.credentials is not None:
        transport_kwargs(o.credentials, o.id)  # files exist; the ACL is per username
        _credential_files(o.credentials)
    for flag, folder in (("--wheels", o.wheels), ("--pin-wheels", o.pin_wheels)):
        if folder is not None and not folder.is_dir():
            raise UsageError(f"{flag} {folder}: no such folder")
    if o.wheels is not None and o.pin_wheels is not None:
        raise UsageError("--wheels and --pin-wheels: give one (--wheels also pins)")
    if o.out.exists() and o.out.is_dir():
        raise UsageError(f"--out {o.out}: is a folder, expected a .tar.gz path")
    if not o.out.parent.is_dir():
        raise UsageError(f"--out {o.out}: folder {o.out.parent} does not exist")
    return manifest, entry, signer


def _credential_files(path: Path) -> dict[str, Path]:
    """The credentials JSON and every file it names, by path relative to its DIR: any
    string (but the password) naming a file there, at any depth, so that a field added
    later (a device's signing key, the trusted key, the registry) travels with no change
    here. A named file outside DIR is refused: the bundle keeps DIR's layout."""
    from device_runtime.credentials import Credentials

    Credentials.load(path)  # checks the JSON and the fields every client needs
    root = path.resolve().parent.parent
    files = {f"credentials/{path.name}": path.resolve()}
    for where, value in _strings(json.loads(path.read_text(encoding="utf-8"))):
        if where == "password" or not value or "\0" in value or not (root / value).is_file():
            continue
        target = (root / value).resolve()
        if not target.is_relative_to(root):
            raise UsageError(f"credentials {path}: field {where!r}: {value} lies outside "
                             f"{root}; expected a path relative to it")
        files[target.relative_to(root).as_posix()] = target
    return files


def _strings(doc, where: str = ""):
    """(JSON path, value) of every string in a JSON document."""
    if isinstance(doc, str):
        yield where, doc
    elif isinstance(doc, dict):
        for k, v in doc.items():
            yield from _strings(v, f"{where}.{k}" if where else str(k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _strings(v, f"{where}[{i}]")


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


def _write_install_files(stage: Path, o: BundleOptions, needs_torch: bool) -> int:
    """install.sh, the unit template, bundle.env and the requirements (with the lock
    when wheels are pinned); returns how many projects the lock pins."""
    for name in ("install.sh", "fedge-device.service.in"):
        shutil.copy2(TEMPLATES / name, stage / name)
    (stage / "install.sh").chmod(0o755)
    env = {"FEDGE_VERSION": fedge_version(), "DEVICE_ID": o.id, "JOB": o.job,
           "UNIT_NAME": "fedge-device", "NEEDS_TORCH": "1" if needs_torch else "0",
           "TORCH_SPEC": TORCH, "TORCH_INDEX": TORCH_INDEX, "TORCH_SPEC_AARCH64": TORCH_AARCH64}
    (stage / "bundle.env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    roots = device_requirements()
    (stage / "requirements.txt").write_text("\n".join(roots) + "\n")
    wheels = o.wheels or o.pin_wheels
    if wheels is None:
        return 0
    has_torch = any(w.name.startswith("torch-") for w in wheels.glob("*.whl"))
    # The wheelhouse's torch is its target's (2.10.0 on aarch64): pinned as found.
    text, pinned = lock(wheels, roots + (["torch"] if needs_torch and has_torch else []))
    (stage / "requirements.lock").write_text(text)
    return pinned


def _sha256sums(stage: Path) -> str:
    rows = []
    for f in sorted(p for p in stage.rglob("*") if p.is_file()):
        rows.append(f"{sha256_file(f)}  {f.relative_to(stage).as_posix()}")
    return "\n".join(rows) + "\n"


def _tar(stage: Path, root: str, raw) -> None:
    """A reproducible archive: sorted names, fixed owner and time, keys 0600."""
    def clean(ti: tarfile.TarInfo) -> tarfile.TarInfo:
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = "root"
        ti.mtime = 1577836800
        if ti.name.endswith(".key"):
            ti.mode = 0o600
        return ti
    with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w") as tf:
            tf.add(stage, arcname=root, recursive=False, filter=clean)
            for p in sorted(stage.rglob("*")):
                tf.add(p, arcname=f"{root}/{p.relative_to(stage).as_posix()}",
                       recursive=False, filter=clean)
