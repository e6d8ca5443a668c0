"""Ed25519 keys: who signs a message or an export, and which keys a receiver trusts.

- ``Signer``: a private key (PKCS#8 PEM, unencrypted, mode 0600) and its key id. The
  aggregator signs everything it publishes with the job's key; a device signs its
  status, updates and activations with its own key (``fedge secure init`` issues them).
- ``PublicKey``: a public key and its key id; ``verify(signature, data)``.
- ``Registry``: the fleet's device public keys by device id, the file
  ``fedge secure init`` writes and the aggregator reads (``fedge-registry/1``)::

      {"format": "fedge-registry/1", "devices": {"pi-07": "<base64 of the raw 32-byte key>"}}

A key id is the first 16 hex digits of the sha256 of the raw 32-byte public key: it
tells "signed by another key" apart from "modified after signing". No torch.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from device_runtime.errors import TrustError
from device_runtime.raw_keys import ed25519_raw, raw_key_id, read_key_file

REGISTRY_FORMAT = "fedge-registry/1"
SIGNATURE_BYTES = 64
MAX_REGISTRY_FILE = 64 << 20  # ~60 bytes a device: room for a million devices

# Benchmark-only: bench/signing.py sets it to measure a round without signatures, side
# by side with the signed one. Nothing else may set it; a test checks it is off.
BENCH_ONLY_SKIP_SIGNATURES = False


def _serialization():
    from cryptography.hazmat.primitives import serialization

    return serialization


def key_id(public_key: Ed25519PublicKey) -> str:
    """First 16 hex digits of the sha256 of the raw 32-byte public key."""
    return raw_key_id(public_key.public_bytes_raw())


@dataclass(frozen=True)
class PublicKey:
    """A public key a receiver trusts, with its key id."""

    key: Ed25519PublicKey = field(repr=False)
    key_id: str = ""

    @classmethod
    def of(cls, key: Ed25519PublicKey) -> "PublicKey":
        return cls(key, key_id(key))

    @classmethod
    def from_raw(cls, raw: bytes) -> "PublicKey":
        return cls.of(Ed25519PublicKey.from_public_bytes(raw))

    @classmethod
    def load(cls, path: str | Path) -> "PublicKey":
        """The Ed25519 public key in PEM file ``path``, or TrustError naming the file."""
        return cls.of(load_public_key(path))

    def raw(self) -> bytes:
        return self.key.public_bytes_raw()

    def pem(self) -> bytes:
        serialization = _serialization()
        return self.key.public_bytes(serialization.Encoding.PEM,
                                     serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, signature: bytes, data: bytes) -> bool:
        if BENCH_ONLY_SKIP_SIGNATURES:
            return True
        try:
            self.key.verify(bytes(signature), bytes(data))
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class Signer:
    """A private key that signs, with its public half."""

    key: Ed25519PrivateKey = field(repr=False)
    public: PublicKey = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.public is None:
            object.__setattr__(self, "public", PublicKey.of(self.key.public_key()))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls) -> "Signer":
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "Signer":
        """The Ed25519 private key in PEM file ``path`` (TrustError naming the file)."""
        path = Path(path).expanduser()
        return cls.from_pem(read_key_file(path, "signing key"), str(path))

    @classmethod
    def from_pem(cls, data: bytes, path: str = "(in memory)") -> "Signer":
        try:
            key = _serialization().load_pem_private_key(data, password=None)
        except TypeError:
            raise TrustError(f"signing key {path} is encrypted; expected an unencrypted "
                             "PKCS#8 PEM key (mode 0600)") from None
        except ValueError:
            why = "a public key; give the private .key" if b"PUBLIC KEY" in data else \
                "not a PEM private key"
            raise TrustError(f"signing key {path}: expected an Ed25519 private key, got "
                             f"{why}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise TrustError(f"signing key {path}: expected an Ed25519 private key, got "
                             f"{type(key).__name__}")
        return cls(key)

    def sign(self, data: bytes) -> bytes:
        if BENCH_ONLY_SKIP_SIGNATURES:
            return bytes(SIGNATURE_BYTES)
        return self.key.sign(bytes(data))

    def pem(self) -> bytes:
        serialization = _serialization()
        return self.key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())

    def save(self, path: str | Path) -> Path:
        """Write the private key to a new file, mode 0600 from the start."""
        path = Path(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.pem())
        return path


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key in PEM file ``path``, or TrustError naming the file."""
    path = Path(path)
    data = read_key_file(path, "trusted key")
    key = _ed25519_pem(data)
    if key is not None:
        return key
    try:
        key = _serialization().load_pem_public_key(data)
    except (ValueError, TypeError):
        why = "a private key; trust its .pub" if b"PRIVATE KEY" in data else "not a PEM key"
        raise TrustError(f"trusted key {path}: expected an Ed25519 public key (PEM), "
                         f"got {why}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise TrustError(f"trusted key {path}: expected an Ed25519 public key, got "
                         f"{type(key).__name__}")
    return key


def _ed25519_pem(data: bytes) -> Ed25519PublicKey | None:
    """The key of a one-block "PUBLIC KEY" PEM holding an Ed25519 SPKI, else None: read
    directly, it spares a device cryptography's serialization package (SSH, PKCS#12...)."""
    raw = ed25519_raw(data)
    return None if raw is None else Ed25519PublicKey.from_public_bytes(raw)



@dataclass(frozen=True)
class Registry:
    """Device id -> the public key its messages must be signed with."""

    devices: dict[str, PublicKey] = field(default_factory=dict)

    def get(self, device: str) -> PublicKey | None:
        return self.devices.get(device)

    def with_device(self, device: str, key: PublicKey) -> "Registry":
        return Registry({**self.devices, device: key})

    def without(self, device: str) -> "Registry":
        return Registry({d: k for d, k in self.devices.items() if d != device})

    def dumps(self) -> bytes:
        doc = {"format": REGISTRY_FORMAT,
               "devices": {d: base64.b64encode(k.raw()).decode("ascii")
                           for d, k in sorted(self.devices.items())}}
        return (json.dumps(doc, indent=1) + "\n").encode()

    @classmethod
    def loads(cls, data: bytes, where: str) -> "Registry":
        from device_runtime.topics import check_id

        def bad(why: str) -> TrustError:
            return TrustError(f"registry {where}: {why}")
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise bad("not a JSON document") from None
        if not isinstance(doc, dict) or doc.get("format") != REGISTRY_FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise bad(f"format: expected {REGISTRY_FORMAT!r}, got {got!r}")
        devices = doc.get("devices")
        if not isinstance(devices, dict):
            raise bad(f"devices: expected an object, got {type(devices).__name__}")
        out = {}
        for device, b64 in devices.items():
            try:
                check_id("device", device)
                raw = base64.b64decode(b64, validate=True) if isinstance(b64, str) else b""
            except (binascii.Error, ValueError, TypeError) as e:
                raise bad(f"devices.{str(device)[:64]}: {e}") from None
            if len(raw) != 32:
                raise bad(f"devices.{device}: expected the base64 of a 32-byte Ed25519 "
                          f"public key, got {len(raw)} bytes")
            out[device] = PublicKey.from_raw(raw)
        return cls(out)

    @classmethod
    def load(cls, path: str | Path) -> "Registry":
        path = Path(path)
        return cls.loads(read_key_file(path, "registry", MAX_REGISTRY_FILE), str(path))


class RegistryFile:
    """A registry read from a file and read again when the file changes (``fedge secure
    add`` / ``revoke`` take effect without restarting the aggregator)."""

    def __init__(self, path: str | Path | None, registry: Registry | None = None):
        self.path = Path(path) if path is not None else None
        self._stamp: tuple | None = None
        self.registry = registry if registry is not None else Registry()
        if self.path is not None:
            self.refresh()

    def refresh(self) -> bool:
        """Re-read the file if it changed; whether it did. A file that became unreadable
        keeps the registry as it was (and raises TrustError for the caller to log)."""
        if self.path is None:
            return False
        try:
            st = self.path.stat()
        except OSError as e:
            raise TrustError(f"registry {self.path}: cannot read ({e.strerror or e})") from None
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        self.registry = Registry.load(self.path)
        self._stamp = stamp
        return True

    def get(self, device: str) -> PublicKey | None:
        return self.registry.get(device)


class FleetKeys:
    """Keys made on the fly for a fleet run in one place (``fedge demo``, the simulator,
    tests): the aggregator's and one per device, created on first use. ``get`` makes it
    the aggregator's registry; ``to_json`` and ``device_keys`` hand the keys to device
    processes the simulator starts (their private keys in a 0600 spec file)."""

    def __init__(self, server: Signer | None = None, devices: dict[str, Signer] | None = None):
        self.server = server or Signer.generate()
        self._devices = dict(devices or {})

    def device(self, device: str) -> Signer:
        if device not in self._devices:
            self._devices[device] = Signer.generate()
        return self._devices[device]

    def get(self, device: str) -> PublicKey | None:
        signer = self._devices.get(device)
        return signer.public if signer else None

    def registry(self) -> Registry:
        reg = Registry()
        for device, signer in sorted(self._devices.items()):
            reg = reg.with_device(device, signer.public)
        return reg

    def to_json(self, devices: list[str] | None = None) -> dict:
        """What device processes need: the aggregator's public key and their own keys."""
        names = sorted(self._devices) if devices is None else devices
        return {"server_public": self.server.public.pem().decode(),
                "devices": {d: self.device(d).pem().decode() for d in names}}


def device_keys(doc: dict, device: str) -> tuple[Signer, PublicKey]:
    """(the device's key, the aggregator's public key) from ``FleetKeys.to_json``."""
    public = _serialization().load_pem_public_key(doc["server_public"].encode())
    return Signer.from_pem(doc["devices"][device].encode()), PublicKey.of(public)
