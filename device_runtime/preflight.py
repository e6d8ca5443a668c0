"""What a device checks before it takes any task: the export it is given to run.

With a manifest and the public key it trusts, the device verifies the
manifest's signature, its job and version (``device_runtime.rollback``: made for
this job, not older than an export it accepted), then every artifact of its own
profile against the manifest's sha256, and opens its model once in ONNX Runtime
(which also says which execution provider it really gets); only then does it
record the version as accepted. Anything that fails is a refusal:
the agent publishes it as its retained status (state ``"error"``), so the
aggregator reports it and assigns the device nothing, and then stops.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from device_runtime.errors import ManifestError, TrustError
from device_runtime.keys import Signer, load_public_key
from device_runtime.manifest import Artifact, DeviceEntry, load_manifest
from device_runtime.rollback import ExportPolicy, check_binding, record


@dataclass(frozen=True)
class Checked:
    """What a successful check found: reported in the device's status ``versions``."""

    key_id: str  # the trusted key that signed the manifest
    artifacts: int  # artifacts of the profile whose sha256 matched
    provider: str  # the ONNX Runtime execution provider the model opened with
    version: int = 0  # the export's version, now recorded as accepted
    previous: int | None = None  # the version accepted before this check, if any

    def versions(self) -> dict:
        return {"ort_provider": self.provider, "manifest_key": self.key_id,
                "artifacts_verified": self.artifacts, "manifest_version": self.version}


def check_options(manifest: str | Path | None, trust: str | Path | None,
                  key: str | Path | None = None, need_keys: bool = True) -> None:
    """Refuse inconsistent options before anything is published: a device needs the
    aggregator's public key (every message it acts on must verify with it; the export
    is signed by it too) and its own key (to sign what it sends), and the key files
    must be keys."""
    if manifest is not None and trust is None:
        raise TrustError("--manifest needs --trust PUBKEY: without a trusted key the "
                         "manifest's sha256 values prove nothing")
    if need_keys and trust is None:
        raise TrustError("--trust PUBKEY: expected the aggregator's public key (every "
                         "message from the job must be signed with it), got none")
    if need_keys and key is None:
        raise TrustError("--key FILE: expected this device's signing key (fedge secure "
                         "init issues it), got none")
    if trust is not None:
        load_public_key(trust)
    if key is not None:
        Signer.load(key)


def check_device(manifest: str | Path, profile: str, trust: str | Path,
                 threads: int = 1, policy: ExportPolicy = ExportPolicy()) -> Checked:
    """Verify the signature, the job and version (``policy``) and ``profile``'s
    artifacts, open its model once, then record the version as accepted.

    Raises SignatureError / ExportRefusedError / ArtifactVerificationError (exit 6)
    or ManifestError (exit 2), each naming the file; nothing is loaded before its
    check passed, and nothing is recorded unless every check passed.
    """
    # onnxruntime only here: a device started without a manifest never loads it.
    from device_runtime.predictor import open_verified
    from device_runtime.session import provider_of

    m = load_manifest(manifest, trust=trust)
    previous = check_binding(m, policy)
    entry = m.device(profile)
    model = _model_artifact(entry)
    for a in entry.artifacts:
        if a is not model:  # the model is verified by open_verified, just before it opens
            m.verify(a)
    session = open_verified(m, model, threads)
    record(m, policy)
    return Checked(m.key_id or "", len(entry.artifacts), provider_of(session),
                   m.version or 0, previous)


def _model_artifact(entry: DeviceEntry) -> Artifact:
    """The artifact the device would run: the fp32 full model (ONNX, else ORT format),
    else its first SplitMix base, else the first artifact listed."""
    ranked = sorted(entry.artifacts, key=lambda a: (
        a.role not in ("full", "base"), a.precision != "fp32", a.format != "onnx",
        a.index or 0))
    if not ranked:
        raise ManifestError(f"device {entry.name}: the manifest lists no artifact")
    return ranked[0]
