"""The toolkit's exceptions; each maps to a CLI exit code (see device_runtime.errors)."""
from __future__ import annotations

from device_runtime.errors import (
    EXIT_CHECKPOINT,
    EXIT_DATA,
    EXIT_FAILURE,
    EXIT_MODEL,
    EXIT_USAGE,
    FedgeError,
)


class ToolkitError(FedgeError):
    """Base of the toolkit's errors."""


class UsageError(ToolkitError):
    """A bad argument or an unknown name."""

    exit_code = EXIT_USAGE


class ProfileError(ToolkitError):
    """An unknown device profile or a malformed profiles file."""

    exit_code = EXIT_USAGE


class DatasetError(ToolkitError):
    """A dataset cannot be loaded or is inconsistent."""

    exit_code = EXIT_DATA


class UnknownDatasetError(DatasetError):
    """A dataset argument names no built-in dataset and no file: a usage mistake."""

    exit_code = EXIT_USAGE


class CheckpointError(ToolkitError):
    """A checkpoint is missing, corrupt, or does not match its config."""

    exit_code = EXIT_CHECKPOINT


class ModelError(ToolkitError):
    """A model cannot be built, traced, pruned or split."""

    exit_code = EXIT_MODEL


class UnknownModelError(ModelError):
    """A model name that is not in the zoo: a usage mistake."""

    exit_code = EXIT_USAGE


class SecureError(ToolkitError):
    """A bad ``fedge secure`` option, or a folder it must not overwrite."""

    exit_code = EXIT_USAGE


class SimulationError(ToolkitError):
    """A simulation's own machinery failed (``fedge simulate --procs``: a device process
    died); not the user's mistake, so the generic failure code."""

    exit_code = EXIT_FAILURE
