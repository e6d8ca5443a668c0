"""The aggregator service's exceptions."""
from __future__ import annotations

from device_runtime.errors import EXIT_FAILURE, EXIT_USAGE, FedgeError


class BrokerServerError(FedgeError):
    """Base of the broker_server package's errors."""

    exit_code = EXIT_FAILURE


class RobustError(BrokerServerError):
    """A robust-aggregation, clipping or privacy choice that is unknown or inconsistent
    (``broker_server.robust``): Krum with too few devices for f, DP without a clip bound."""

    exit_code = EXIT_USAGE
