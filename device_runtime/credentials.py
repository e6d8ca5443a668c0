"""A client's credentials: ``DIR/credentials/<id>.json`` from ``fedge secure init``.

The file is a JSON object; only ``username`` is required::

    username     the MQTT username (a device's id, or "aggregator")
    password     the aggregator's password (devices have none: their certificate is
                 their identity on the broker)
    cert, key    the client's TLS certificate and key (both or neither)
    ca           the fleet's CA, to check the broker's certificate
    signing_key  the client's Ed25519 private key (device_runtime.keys.Signer)
    trust        a device's: the aggregator's public key (server.pub)
    registry     the aggregator's: the devices' public keys (registry.json)
    max_payload  bytes per MQTT message this broker takes (frames above it travel as
                 chunks): fedge secure init writes what its Mosquitto accepts, capped
                 at 1 MiB; an explicit --max-payload wins, without either 128 KiB

Paths are relative to DIR, the file's grandparent (a bundle copied elsewhere keeps the
layout ``credentials/<id>.json``, ``ca.crt``, ``certs/<id>.*``, ``server.pub``), or
absolute. ``--keys-only`` files have no password and no TLS files. No torch; the
password never appears in a repr or an error message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError
from device_runtime.files import read_bytes
from device_runtime.transport.base import DEFAULT_MAX_PAYLOAD

STRINGS = ("username", "password")
MAX_PAYLOAD_RANGE = (4096, 268_435_455)  # room for a chunk's header .. MQTT's ceiling
FILES = ("cert", "key", "ca", "signing_key", "trust", "registry")


class CredentialsError(DeviceRuntimeError):
    """A credentials file is missing or malformed, or names a file that is not there."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str | None = field(default=None, repr=False)
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    signing_key: Path | None = None
    trust: Path | None = None
    registry: Path | None = None
    max_payload: int | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Credentials":
        """Read and check a credentials file; the paths come back resolved."""
        path = Path(path)
        data = read_bytes(path, "credentials", CredentialsError)
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise CredentialsError(f"credentials {path}: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CredentialsError(f"credentials {path}: expected a JSON object, "
                                   f"got {type(raw).__name__}")
        for name in (*STRINGS, *FILES):
            value = raw.get(name)
            if (name == "username" or name in raw) and (not isinstance(value, str)
                                                        or not value):
                got = ("nothing" if name not in raw else "an empty string" if value == ""
                       else type(value).__name__)  # never echo a value: it may be a secret
                raise CredentialsError(f"credentials {path}: field {name!r}: expected a "
                                       f"non-empty string, got {got}")
        if ("cert" in raw) != ("key" in raw):
            has, lacks = ("cert", "key") if "cert" in raw else ("key", "cert")
            raise CredentialsError(f"credentials {path}: field {lacks!r}: expected a "
                                   f"non-empty string, got nothing (it goes with {has!r})")
        size = raw.get("max_payload")
        low, high = MAX_PAYLOAD_RANGE
        if "max_payload" in raw and not (type(size) is int and low <= size <= high):
            raise CredentialsError(f"credentials {path}: field 'max_payload': expected an "
                                   f"integer in {low}..{high}, got {str(size)[:20]}")
        root = path.resolve().parent.parent
        files = {name: root / raw[name] for name in FILES if name in raw}
        for name, p in files.items():
            if not p.is_file():
                raise CredentialsError(f"credentials {path}: field {name!r}: no file {p}")
        return cls(raw["username"], raw.get("password"), **files, max_payload=size)

    def transport_kwargs(self) -> dict:
        """Keyword arguments for ``MqttTransport``: the username, and the password and
        TLS files the file has (a ``--keys-only`` file has none)."""
        kw: dict = {"username": self.username, "password": self.password}
        if self.ca is not None:
            kw["ca_file"] = str(self.ca)
        if self.cert is not None:
            kw.update(cert_file=str(self.cert), key_file=str(self.key))
        return kw


def transport_kwargs(path: str | Path | None, client: str | None = None) -> dict:
    """``MqttTransport`` keyword arguments from a credentials file, ``{}`` without one.
    With ``client`` (a device id), a file for another username is refused: the broker's
    ACL (fedge secure init) lets a device publish only under its own username."""
    if path is None:
        return {}
    creds = Credentials.load(path)
    if client is not None and creds.username != client:
        raise CredentialsError(f"credentials {path}: they are for {creds.username!r}, "
                               f"not for this client {client!r}")
    return creds.transport_kwargs()


def payload_limit(option: int | None, path: str | Path | None) -> int:
    """Bytes per MQTT message: ``option`` (--max-payload) if given, else the credentials
    file's ``max_payload``, else ``DEFAULT_MAX_PAYLOAD``."""
    if option is not None:
        return option
    creds = Credentials.load(path) if path is not None else None
    return creds.max_payload if creds and creds.max_payload else DEFAULT_MAX_PAYLOAD


def key_paths(path: str | Path | None, given: dict[str, str | None]) -> tuple:
    """Each key file of ``given`` (field name -> the option's value): the option if set,
    else the credentials file's field of that name (``signing_key``, ``trust``,
    ``registry``), else None."""
    creds = Credentials.load(path) if path is not None else None
    return tuple(value if value is not None or creds is None else
                 (str(getattr(creds, name)) if getattr(creds, name) else None)
                 for name, value in given.items())
