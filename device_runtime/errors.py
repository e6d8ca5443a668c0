"""The root of fedge's exceptions, and the device runtime's own branch.

Every package (toolkit, exporters, device_runtime, broker_server) raises only
subclasses of its own base, and every base derives from ``FedgeError``. The CLI
catches ``FedgeError``, prints its message on one line and exits with
``exit_code``; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

# Exit codes shared by every package; README.md documents them.
EXIT_FAILURE = 1
EXIT_USAGE = 2  # bad argument, unknown name, malformed user file
EXIT_DATA = 3  # dataset or input array unusable
EXIT_CHECKPOINT = 4  # checkpoint missing, corrupt or inconsistent
EXIT_MODEL = 5  # model cannot be built, traced or pruned
EXIT_VERIFY = 6  # an artifact failed a hash, signature or parity check


class FedgeError(Exception):
    """Base of every error fedge reports to a user (one line, no traceback)."""

    exit_code: int = EXIT_FAILURE


class DeviceRuntimeError(FedgeError):
    """Base of the device runtime's errors."""


class ManifestError(DeviceRuntimeError):
    """A manifest is missing, malformed, or names something that is not there."""

    exit_code = EXIT_USAGE


class ArtifactVerificationError(DeviceRuntimeError):
    """An artifact's bytes do not match the manifest (sha256, size)."""

    exit_code = EXIT_VERIFY


class ModelBuildError(DeviceRuntimeError):
    """A model cannot be built from its config (unknown arch, bad factory)."""

    exit_code = EXIT_MODEL


class ModelNotAllowedError(ModelBuildError):
    """A custom model factory the operator did not allow on this machine, or allowed
    with other kwargs (``device_runtime.local_models``)."""


class AllowSpecError(DeviceRuntimeError):
    """An ``--allow-custom-model`` entry that is not ``module:callable[={json}]``."""

    exit_code = EXIT_USAGE


class InputArrayError(DeviceRuntimeError):
    """An input array does not fit the model (shape, dtype, finiteness)."""

    exit_code = EXIT_DATA


class BudgetError(DeviceRuntimeError):
    """An inference budget the loaded models cannot meet, or not a budget at all."""

    exit_code = EXIT_USAGE


class WireError(DeviceRuntimeError):
    """A frame or chunk is malformed, inconsistent, or not what the receiver expects."""

    exit_code = EXIT_DATA


class UnauthenticatedError(WireError):
    """A message not signed by the key it must be, or not bound to this job, device,
    round or session: refused, counted and logged, and never answered (answering each
    forged message would let a flood of them drive traffic)."""


class ChunkRefusedError(WireError):
    """A well-formed chunk the reassembler will not hold: a limit per sender, per topic
    or in all would be passed. Nothing already held changes."""


class SignatureError(ArtifactVerificationError):
    """A manifest's signature is missing, malformed, by another key, or does not verify."""


class ExportRefusedError(ArtifactVerificationError):
    """A validly signed export the device will not use: unversioned, made for another
    job, or older than one it has accepted (a rollback), or a ledger it cannot keep."""


class TrustError(DeviceRuntimeError):
    """No trusted key where one is needed, or a key file that is not a usable key."""

    exit_code = EXIT_USAGE


class ProviderError(DeviceRuntimeError):
    """An ONNX Runtime execution provider that is unknown or not available here."""

    exit_code = EXIT_USAGE


class RefusedError(DeviceRuntimeError):
    """A device refuses to work on an export that failed its checks; keeps the cause's
    exit code (6 for a hash or signature, 2 for a malformed manifest)."""

    def __init__(self, cause: FedgeError) -> None:
        super().__init__(f"refused: {cause}")
        self.exit_code = cause.exit_code
