"""The exporters' exceptions."""
from __future__ import annotations

from device_runtime.errors import EXIT_MODEL, EXIT_VERIFY, FedgeError


class ExportError(FedgeError):
    """An artifact could not be produced (export, quantization, conversion)."""

    exit_code = EXIT_MODEL


class ParityError(ExportError):
    """An artifact does not compute what the torch model computes."""

    exit_code = EXIT_VERIFY
