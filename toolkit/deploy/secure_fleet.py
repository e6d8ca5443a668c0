"""``fedge secure add ID`` and ``fedge secure revoke ID``: one device into or out of a
fleet that ``fedge secure init`` wrote, without touching anyone else's credentials.
``fedge secure add dashboard`` issues the read-only dashboard login to a fleet written
before ``init`` issued one.

``registry.json`` is the list of the fleet's devices: the ACL is regenerated from it.
Each file is replaced atomically (``secure.write_file``), in an order that never
trusts more than intended if a step fails: ``add`` writes the device's own files
first and the registry last; ``revoke`` writes the registry first (the aggregator
stops accepting the device's signatures as soon as it re-reads the file), then the
CRL and the ACL, and deletes the device's private files last. Mosquitto re-reads the
ACL and the CRL on SIGHUP (docs/security.md).
"""
from __future__ import annotations

from pathlib import Path

from cryptography import x509

from device_runtime.credentials import Credentials, CredentialsError
from device_runtime.errors import FedgeError
from device_runtime.files import read_bytes
from device_runtime.keys import Registry
from toolkit.deploy.secure import (
    PUBLIC,
    SECRET,
    cert_pem,
    check_device_id,
    device_files,
    issue,
    key_pem,
    new_key,
    write_file,
)
from toolkit.deploy.secure_conf import (
    AGGREGATOR,
    DASHBOARD,
    acl_text,
    credentials_json,
    password_line,
)
from toolkit.deploy.secure_pki import crl_pem, load_ca, make_crl, revoked_serials
from toolkit.errors import SecureError


def _registry(root: Path) -> Registry:
    path = root / "registry.json"
    if not path.is_file():
        raise SecureError(f"{root}: no registry.json; expected a folder written by "
                          f"fedge secure init (run it again if this one predates keys)")
    try:
        return Registry.load(path)
    except FedgeError as e:
        raise SecureError(str(e)) from None


def _tls(root: Path) -> bool:
    """A TLS fleet (its mosquitto.conf, CA and ACL), or a --keys-only one."""
    return (root / "ca.crt").is_file()


def _payload(root: Path) -> int | None:
    """The max_payload the fleet's clients use: the aggregator's credentials' (written
    by init from the broker's message limit, checked as every client checks it); None
    if it has none (--keys-only, a fleet written before credentials carried it, or a
    file that does not load)."""
    try:
        return Credentials.load(root / "credentials" / f"{AGGREGATOR}.json").max_payload
    except CredentialsError:
        return None


def _read(path: Path, what: str) -> bytes:
    return read_bytes(path, what, SecureError)


def _ca(root: Path):
    try:
        return load_ca(_read(root / "ca.crt", "CA certificate"), _read(root / "ca.key", "CA key"))
    except ValueError as e:
        raise SecureError(f"{root / 'ca.key'}: not the CA's key ({e})") from None


def add(root: Path, device: str, days: int = 825) -> dict:
    """Issue ``device``'s certificate, signing key and credentials; list it in the ACL
    and the registry. A summary."""
    root = Path(root).resolve()
    check_device_id(device, "ID")
    if days < 1:
        raise SecureError(f"--days: expected >= 1, got {days}")
    reg = _registry(root)
    if device in reg.devices:
        raise SecureError(f"ID {device!r}: already in the fleet ({root / 'registry.json'}); "
                          f"revoke it first to issue new credentials")
    tls = _tls(root)
    ca, ca_key = _ca(root) if tls else (None, None)
    files, signer = device_files(device, ca, ca_key, days, tls, _payload(root))
    try:
        for rel, (data, mode) in files.items():
            write_file(root / rel, data, mode)
        if tls:
            write_file(root / "broker" / "acl", acl_text([*reg.devices, device]).encode(), PUBLIC)
        write_file(root / "registry.json", reg.with_device(device, signer.public).dumps(), PUBLIC)
    except OSError as e:
        raise SecureError(f"{root}: cannot write: {e}") from None
    return {"out": str(root), "device": device, "tls": tls, "key_id": signer.key_id,
            "credentials": str(root / "credentials" / f"{device}.json")}


def add_dashboard(root: Path, days: int = 825) -> dict:
    """The dashboard's login (TLS: a certificate, a password in the broker's password
    file, its read-only ACL block) and credentials (trust and registry, no signing key)
    for a fleet that has none. A summary."""
    import secrets

    root = Path(root).resolve()
    reg = _registry(root)
    creds = root / "credentials" / f"{DASHBOARD}.json"
    if creds.exists():
        raise SecureError(f"ID {DASHBOARD!r}: already issued ({creds})")
    tls = _tls(root)
    password = None
    try:
        if tls:
            ca, ca_key = _ca(root)
            password = secrets.token_urlsafe(24)
            key = new_key()
            write_file(root / "certs" / f"{DASHBOARD}.crt",
                       cert_pem(issue(ca, ca_key, key, DASHBOARD, days)), PUBLIC)
            write_file(root / "certs" / f"{DASHBOARD}.key", key_pem(key), SECRET)
            passwd = _read(root / "broker" / "passwd", "password file")
            lines = [ln for ln in passwd.decode().splitlines()
                     if ln and not ln.startswith(f"{DASHBOARD}:")]
            write_file(root / "broker" / "passwd", "".join(
                ln + "\n" for ln in [*lines, password_line(DASHBOARD, password)]).encode(),
                SECRET)
            write_file(root / "broker" / "acl", acl_text(list(reg.devices)).encode(), PUBLIC)
        creds.parent.mkdir(exist_ok=True)
        write_file(creds, credentials_json(DASHBOARD, password, tls, None, _payload(root)),
                   SECRET)
    except OSError as e:
        raise SecureError(f"{root}: cannot write: {e}") from None
    return {"out": str(root), "device": DASHBOARD, "tls": tls, "credentials": str(creds)}


def revoke(root: Path, device: str, days: int = 825) -> dict:
    """Take ``device`` out of the registry and the ACL, add its certificate to the CRL
    and delete its private files. A summary."""
    root = Path(root).resolve()
    reg = _registry(root)
    if device not in reg.devices:
        known = ", ".join(sorted(reg.devices)) or "none"
        raise SecureError(f"ID {device!r}: not in the fleet ({root / 'registry.json'}); "
                          f"its devices: {known}")
    tls = _tls(root)
    crl = None
    if tls:  # everything read and checked before the first write
        ca, ca_key = _ca(root)
        cert = _read(root / "certs" / f"{device}.crt", "device's certificate")
        serials = revoked_serials(_read(root / "broker" / "crl.pem", "revocation list"))
        serial = x509.load_pem_x509_certificate(cert).serial_number
        crl = crl_pem(make_crl(ca, ca_key, [*serials, serial], days))
    rest = reg.without(device)
    try:
        write_file(root / "registry.json", rest.dumps(), PUBLIC)
        if crl is not None:
            write_file(root / "broker" / "crl.pem", crl, PUBLIC)
            write_file(root / "broker" / "acl", acl_text(list(rest.devices)).encode(), PUBLIC)
        for rel in (f"certs/{device}.key", f"certs/{device}.signing.key",
                    f"credentials/{device}.json"):
            (root / rel).unlink(missing_ok=True)
    except OSError as e:
        raise SecureError(f"{root}: cannot write: {e}") from None
    return {"out": str(root), "device": device, "tls": tls, "devices": sorted(rest.devices)}

