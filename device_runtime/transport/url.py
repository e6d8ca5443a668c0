"""Broker URLs: ``mqtt://host:port`` and ``mqtts://user:password@host:port``."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError


class TransportError(DeviceRuntimeError):
    """The broker cannot be reached, refuses us, or the URL is wrong."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class BrokerURL:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> "BrokerURL":
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts"):
            raise TransportError(f"broker URL {url!r}: scheme must be mqtt or mqtts, "
                                 f"got {parts.scheme or 'none'!r}")
        try:
            port = parts.port
        except ValueError:
            raise TransportError(f"broker URL {url!r}: port is not a number") from None
        if not parts.hostname:
            raise TransportError(f"broker URL {url!r}: missing host")
        tls = parts.scheme == "mqtts"
        return cls(parts.hostname, port or (8883 if tls else 1883), tls,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)

    def __str__(self) -> str:  # never print the password
        user = f"{self.username}@" if self.username else ""
        return f"{'mqtts' if self.tls else 'mqtt'}://{user}{self.host}:{self.port}"
