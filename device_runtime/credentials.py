"""A client's broker credentials: ``DIR/credentials/<id>.json`` from ``fedge secure init``.

The file is ``{"username", "password", "cert", "key", "ca"}``; the three paths are
relative to DIR, the file's grandparent (a bundle copied elsewhere keeps the layout
``credentials/<id>.json``, ``ca.crt``, ``certs/<id>.crt``, ``certs/<id>.key``).
No torch; the password never appears in a repr or an error message.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.errors import EXIT_USAGE, DeviceRuntimeError

FIELDS = ("username", "password", "cert", "key", "ca")
FILES = ("cert", "key", "ca")


class CredentialsError(DeviceRuntimeError):
    """A credentials file is missing or malformed, or names a file that is not there."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    cert: Path
    key: Path
    ca: Path

    @classmethod
    def load(cls, path: str | Path) -> "Credentials":
        """Read and check a credentials file; the paths come back resolved."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise CredentialsError(f"credentials {path}: cannot read: "
                                   f"{e.strerror or e}") from None
        except (UnicodeDecodeError, ValueError) as e:
            raise CredentialsError(f"credentials {path}: not JSON: {e}") from None
        if not isinstance(raw, dict):
            raise CredentialsError(f"credentials {path}: expected a JSON object, "
                                   f"got {type(raw).__name__}")
        for name in FIELDS:
            value = raw.get(name)
            if not isinstance(value, str) or not value:
                got = ("nothing" if name not in raw else "an empty string" if value == ""
                       else type(value).__name__)  # never echo a value: it may be a secret
                raise CredentialsError(f"credentials {path}: field {name!r}: expected a "
                                       f"non-empty string, got {got}")
        root = path.resolve().parent.parent
        files = {name: root / raw[name] for name in FILES}
        for name, p in files.items():
            if not p.is_file():
                raise CredentialsError(f"credentials {path}: field {name!r}: no file {p}")
        return cls(raw["username"], raw["password"], **files)

    def transport_kwargs(self) -> dict:
        """Keyword arguments for ``MqttTransport`` (TLS with a client certificate)."""
        return {"ca_file": str(self.ca), "cert_file": str(self.cert),
                "key_file": str(self.key), "username": self.username,
                "password": self.password}


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


def key_paths(path: str | Path | None, given: dict[str, str | None]) -> tuple:
    """Each key file of ``given`` (field name -> the option's value): the option if set,
    else the credentials file's field of that name (``signing_key``, ``trust``,
    ``registry``; relative paths are relative to DIR, the file's grandparent, like the
    other paths), else None."""
    raw: dict = {}
    if path is not None:
        try:
            raw = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CredentialsError(f"credentials {path}: cannot read: {e}") from None
        raw = raw if isinstance(raw, dict) else {}
    out = []
    for name, value in given.items():
        if value is None and isinstance(raw.get(name), str) and raw[name]:
            value = str(Path(path).resolve().parent.parent / raw[name])
        out.append(value)
    return tuple(out)
