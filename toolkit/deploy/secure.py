"""``fedge secure init``: TLS, identities, signing keys and ACLs for a fleet's broker.

One call writes, for a list of device ids, everything a Mosquitto 2 broker and its
clients need to run a fleet over mutual TLS, each device's certificate being its
identity, and the Ed25519 keys that sign the job's messages end to end
(docs/security.md):

    DIR/mosquitto.conf            two TLS listeners (devices on --port, the aggregator
                                  on --aggregator-port), the ACL, the size limits
    DIR/ca.crt, ca.key            the fleet's CA; its key (0600) signs more certificates
    DIR/broker/server.crt, .key   the broker's certificate (SANs: localhost, loopback,
                                  this machine's hostname, each --host)
    DIR/broker/passwd             the aggregator's and the dashboard's passwords ($7$)
    DIR/broker/acl, crl.pem       the ACL (a block per device) and the CA's revocation list
    DIR/certs/<id>.crt, .key      a client certificate (CN = id) per device, the aggregator
                                  and the dashboard (which may only read: the ACL)
    DIR/certs/<id>.signing.key    a device's Ed25519 signing key (0600)
    DIR/certs/aggregator.signing.key  the aggregator's, unless --signing-key names one
    DIR/server.pub                the aggregator's public key: every device trusts it
    DIR/registry.json             the devices' public keys (fedge-registry/1): the
                                  aggregator checks their signatures with it
    DIR/credentials/<id>.json     paths relative to DIR (device_runtime.credentials)

``--keys-only`` writes just the signing keys, server.pub, registry.json and the
credentials (no TLS, no passwords), for a broker without TLS (tests, ``fedge demo``).
``init`` builds every file in memory, writes them into a staging folder beside DIR
and renames it into place, so an error leaves nothing behind. ``toolkit.deploy.secure_fleet``
adds and revokes devices afterwards.
"""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from device_runtime.errors import FedgeError
from device_runtime.keys import Registry, Signer
from device_runtime.topics import check_id
from toolkit.deploy.secure_conf import (
    AGGREGATOR,
    DASHBOARD,
    PACKET_SLACK,
    Limits,
    acl_text,
    client_payload,
    conf_text,
    current_user,
    credentials_json,
    password_line,
)
from toolkit.deploy.secure_pki import (
    cert_pem,
    crl_pem,
    is_host,
    issue,
    key_pem,
    make_ca,
    make_crl,
    new_key,
    san_entries,
    server_names,
)
from toolkit.errors import SecureError

__all__ = ["AGGREGATOR", "SecureOptions", "check_options", "materials", "init", "write_tree",
           "write_file", "new_key", "make_ca", "issue", "cert_pem", "key_pem"]

MQTT_MAX_PAYLOAD = 268_435_455 - PACKET_SLACK  # MQTT's largest packet, less the topic
PUBLIC, SECRET = 0o644, 0o600


@dataclass(frozen=True)
class SecureOptions:
    devices: tuple[str, ...]
    out: Path
    port: int = 8883
    hosts: tuple[str, ...] = ()
    days: int = 825  # certificate lifetime (825 days: what Apple's TLS policy accepts)
    aggregator_port: int = 0  # 0: port + 1
    keys_only: bool = False
    signing_key: Path | None = None  # the aggregator's key; None: a new one in DIR
    limits: Limits = field(default_factory=Limits)

    @property
    def agg_port(self) -> int:
        return self.aggregator_port or self.port + 1


# --- checks ------------------------------------------------------------------------------


def check_device_id(d: str, flag: str = "--devices") -> None:
    try:
        check_id("device", d)
    except FedgeError as e:
        raise SecureError(f"{flag}: {e}") from None
    if d in (AGGREGATOR, DASHBOARD):
        raise SecureError(f"{flag}: {d!r} is the {d}'s id; name the device otherwise")


def _check_limits(limits: Limits) -> None:
    if not 1024 <= limits.max_message <= MQTT_MAX_PAYLOAD:
        raise SecureError(f"--max-message: expected 1024-{MQTT_MAX_PAYLOAD} bytes, got "
                          f"{limits.max_message}")
    if limits.max_queued_messages < 1:
        raise SecureError(f"--max-queued-messages: expected >= 1, got "
                          f"{limits.max_queued_messages}")
    if limits.max_queued_bytes and limits.max_queued_bytes < limits.max_message:
        raise SecureError(f"--max-queued-bytes: expected at least --max-message "
                          f"({limits.max_message}), got {limits.max_queued_bytes}")


def check_options(opts: SecureOptions) -> None:
    """Every mistake a user can make, before anything is generated or written."""
    if not opts.devices:
        raise SecureError("--devices: expected at least one device id")
    seen: set[str] = set()
    for d in opts.devices:
        check_device_id(d)
        if d in seen:
            raise SecureError(f"--devices: {d!r} given twice")
        seen.add(d)
    for flag, port in (("--port", opts.port), ("--aggregator-port", opts.agg_port)):
        if not 1 <= port <= 65535:
            raise SecureError(f"{flag}: expected 1-65535, got {port}")
    if opts.agg_port == opts.port:
        raise SecureError(f"--aggregator-port: expected another port than --port "
                          f"{opts.port}")
    if opts.days < 1:
        raise SecureError(f"--days: expected >= 1, got {opts.days}")
    for h in opts.hosts:
        if not is_host(h):
            raise SecureError(f"--host: expected a host name or IP address, got {h!r}")
    _check_limits(opts.limits)
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SecureError(f"--out {out}: exists and is not an empty folder; "
                          f"secure init never overwrites keys")


def aggregator_signer(path: Path | None) -> Signer:
    """The aggregator's signing key: ``path``'s (e.g. the export key), or a new one."""
    if path is None:
        return Signer.generate()
    try:
        return Signer.load(path)
    except FedgeError as e:
        raise SecureError(f"--signing-key: {e}") from None


# --- the files -----------------------------------------------------------------------------


def device_files(device: str, ca, ca_key, days: int, tls: bool, max_payload: int | None = None
                 ) -> tuple[dict[str, tuple[bytes, int]], Signer]:
    """A device's own files (its certificate and key with ``tls``, its signing key and
    its credentials) and its signer, whose public key goes into the registry."""
    signer = Signer.generate()
    files = {f"certs/{device}.signing.key": (signer.pem(), SECRET),
             f"credentials/{device}.json": (credentials_json(
                 device, None, tls, f"certs/{device}.signing.key", max_payload), SECRET)}
    if tls:
        key = new_key()
        files[f"certs/{device}.crt"] = (cert_pem(issue(ca, ca_key, key, device, days)), PUBLIC)
        files[f"certs/{device}.key"] = (key_pem(key), SECRET)
    return files, signer


def _broker_files(opts: SecureOptions, hostname: str | None) -> tuple[dict, object, object]:
    ca_key = new_key()
    ca = make_ca(ca_key, opts.days)
    key = new_key()
    names = server_names(opts.hosts, hostname)
    files = {"ca.crt": (cert_pem(ca), PUBLIC), "ca.key": (key_pem(ca_key), SECRET),
             "broker/server.crt": (cert_pem(issue(ca, ca_key, key, names[0], opts.days,
                                                  san_entries(names))), PUBLIC),
             "broker/server.key": (key_pem(key), SECRET),
             "broker/crl.pem": (crl_pem(make_crl(ca, ca_key, [], opts.days)), PUBLIC),
             "broker/acl": (acl_text(opts.devices).encode(), PUBLIC),
             "mosquitto.conf": (conf_text(opts.out, opts.port, opts.agg_port,
                                          opts.limits, current_user()).encode(), PUBLIC)}
    return files, ca, ca_key


def materials(opts: SecureOptions, hostname: str | None = None,
              signer: Signer | None = None) -> dict[str, tuple[bytes, int]]:
    """Every file ``init`` writes, in memory: {path relative to DIR: (bytes, mode)}."""
    tls = not opts.keys_only
    files, ca, ca_key = _broker_files(opts, hostname) if tls else ({}, None, None)
    signer = signer or aggregator_signer(opts.signing_key)
    if opts.signing_key is None:
        own = f"certs/{AGGREGATOR}.signing.key"
        files[own] = (signer.pem(), SECRET)
    else:
        own = str(Path(opts.signing_key).expanduser().resolve())
    passwords: dict[str, str | None] = {AGGREGATOR: None, DASHBOARD: None}
    if tls:  # both log in on the aggregator's listener: a fleet certificate and a password
        passwords = {c: secrets.token_urlsafe(24) for c in passwords}
        files["broker/passwd"] = ("".join(password_line(c, p) + "\n"
                                          for c, p in passwords.items()).encode(), SECRET)
        for client in passwords:
            key = new_key()
            files[f"certs/{client}.crt"] = (cert_pem(issue(ca, ca_key, key, client,
                                                           opts.days)), PUBLIC)
            files[f"certs/{client}.key"] = (key_pem(key), SECRET)
    # The broker written here takes limits.max_message: its clients need not chunk at
    # the 128 KiB any broker takes (--keys-only: the broker is someone else's).
    payload = client_payload(opts.limits) if tls else None
    files[f"credentials/{AGGREGATOR}.json"] = (credentials_json(
        AGGREGATOR, passwords[AGGREGATOR], tls, own, payload), SECRET)
    files[f"credentials/{DASHBOARD}.json"] = (credentials_json(
        DASHBOARD, passwords[DASHBOARD], tls, None, payload), SECRET)
    keys = {}
    for d in opts.devices:
        mine, device_signer = device_files(d, ca, ca_key, opts.days, tls, payload)
        files.update(mine)
        keys[d] = device_signer.public
    files["server.pub"] = (signer.public.pem(), PUBLIC)
    files["registry.json"] = (Registry(keys).dumps(), PUBLIC)
    return files


def write_tree(files: dict[str, tuple[bytes, int]], out: Path) -> None:
    """Write ``files`` into a staging folder beside ``out``, then rename it to ``out``
    (which may exist only as an empty folder): all of them or nothing."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for rel, (data, mode) in files.items():
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(path, mode)  # the umask may have narrowed PUBLIC
        os.chmod(stage, 0o755)
        if out.exists():
            out.rmdir()  # empty: checked before; a race that filled it fails here
        os.rename(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically with ``data`` (see ``replace_file``)."""
    replace_file(path, lambda f: f.write(data), mode)


def replace_file(path: Path, write, mode: int) -> None:
    """Replace ``path`` atomically: ``write(file)`` into a temporary file beside it,
    ``mode`` from the start, renamed over it (a reader sees the old file or the new,
    never half of one)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def init(opts: SecureOptions) -> dict:
    """Check the options, generate everything, write it to ``opts.out``; a summary."""
    check_options(opts)
    files = materials(opts)
    try:
        write_tree(files, opts.out)
    except OSError as e:
        raise SecureError(f"--out {opts.out}: cannot write: {e}") from None
    clients = [AGGREGATOR, DASHBOARD, *opts.devices]
    out = Path(opts.out).resolve()
    return {"out": str(out), "conf": None if opts.keys_only else str(out / "mosquitto.conf"),
            "port": opts.port, "aggregator_port": opts.agg_port,
            "server_names": [] if opts.keys_only else server_names(opts.hosts),
            "signing_key": str(opts.signing_key or out / "certs" / f"{AGGREGATOR}.signing.key"),
            "credentials": {c: str(out / "credentials" / f"{c}.json") for c in clients}}
