"""The aggregator service's exceptions."""
from __future__ import annotations

from device_runtime.errors import EXIT_FAILURE, FedgeError


class BrokerServerError(FedgeError):
    """Base of the broker_server package's errors."""

    exit_code = EXIT_FAILURE
