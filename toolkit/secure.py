"""``fedge secure init``: TLS, passwords and ACLs for a fleet's Mosquitto broker.

One call writes, for a list of device ids, everything a Mosquitto 2 broker and
its clients need to run a fleet over mutual TLS with per-client passwords and
per-device ACLs (docs/security.md):

    DIR/mosquitto.conf            TLS listener on --port, absolute paths
    DIR/ca.crt                    the fleet's CA (every client and the broker trust it)
    DIR/ca.key                    the CA's key (0600): only needed to sign more certificates
    DIR/broker/server.crt, .key   the broker's certificate (SANs: localhost, loopback,
                                  this machine's hostname, each --host)
    DIR/broker/passwd             Mosquitto's password file ($7$, PBKDF2-SHA512)
    DIR/broker/acl                Mosquitto's ACL file
    DIR/certs/<id>.crt, .key      a client certificate per device and for the aggregator
    DIR/credentials/<id>.json     {"username", "password", "cert", "key", "ca"}, paths
                                  relative to DIR (device_runtime.credentials reads it)

Generation is pure functions (keys, certificates, the password line, the ACL and
the config text); ``init`` builds every file in memory, writes them into a staging
folder beside DIR and renames it into place, so an error leaves nothing behind.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_runtime.errors import FedgeError
from device_runtime.topics import check_id
from toolkit.errors import SecureError

AGGREGATOR = "aggregator"  # the aggregator's id and username; no device may take it
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$ hashes
SALT_BYTES = 12
_LABEL = r"[A-Za-z0-9][A-Za-z0-9-]{0,62}"
_HOST = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")  # a DNS name (an IP is checked apart)

# Per-device ACL rules: (access, topic pattern); %u is the username, i.e. the device
# id. Frames larger than the transport's max_payload travel as chunks on
# <topic>/_c/<index> (device_runtime.transport.base), and a subscription to a topic
# also covers those, so each rule comes with its "<topic>/_c/+" twin.
DEVICE_RULES: tuple[tuple[str, str], ...] = (
    ("write", "fedge/+/devices/%u/status"),
    ("write", "fedge/+/round/+/update/%u"),
    ("write", "fedge/+/round/+/acts/%u"),
    ("read", "fedge/+/plan"),
    ("read", "fedge/+/control"),
    ("read", "fedge/+/asset/+"),
    ("read", "fedge/+/round/+/model/+"),
    ("read", "fedge/+/round/+/sync/+"),
    ("read", "fedge/+/round/+/task/%u"),
    ("read", "fedge/+/round/+/grad/%u"),
)


@dataclass(frozen=True)
class SecureOptions:
    devices: tuple[str, ...]
    out: Path
    port: int = 8883
    hosts: tuple[str, ...] = ()
    days: int = 825  # certificate lifetime (825 days: what Apple's TLS policy accepts)


# --- pure pieces -------------------------------------------------------------------


def check_options(opts: SecureOptions) -> None:
    """Every mistake a user can make, before anything is generated or written."""
    if not opts.devices:
        raise SecureError("--devices: expected at least one device id")
    seen: set[str] = set()
    for d in opts.devices:
        try:
            check_id("device", d)
        except FedgeError as e:
            raise SecureError(f"--devices: {e}") from None
        if d == AGGREGATOR:
            raise SecureError(f"--devices: {AGGREGATOR!r} is the aggregator's id; "
                              f"name the device otherwise")
        if d in seen:
            raise SecureError(f"--devices: {d!r} given twice")
        seen.add(d)
    if not 1 <= opts.port <= 65535:
        raise SecureError(f"--port: expected 1-65535, got {opts.port}")
    if opts.days < 1:
        raise SecureError(f"--days: expected >= 1, got {opts.days}")
    for h in opts.hosts:
        if not _is_host(h):
            raise SecureError(f"--host: expected a host name or IP address, got {h!r}")
    out = Path(opts.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SecureError(f"--out {out}: exists and is not an empty folder; "
                          f"secure init never overwrites keys")


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedge"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    # an hour back: a device whose clock runs a little slow still accepts the broker
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(
        now + dt.timedelta(days=days)).serial_number(x509.random_serial_number())


def make_ca(key: ec.EllipticCurvePrivateKey, days: int,
            common_name: str = "fedge fleet CA") -> x509.Certificate:
    """A self-signed CA that may sign end-entity certificates only (path length 0)."""
    pub = key.public_key()
    b = _validity(x509.CertificateBuilder().subject_name(_name(common_name))
                  .issuer_name(_name(common_name)).public_key(pub), days)
    b = (b.add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
         .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                      False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    return b.sign(key, hashes.SHA256())


def issue(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey,
          key: ec.EllipticCurvePrivateKey, common_name: str, days: int,
          server_names: list[x509.GeneralName] | None = None) -> x509.Certificate:
    """An end-entity certificate: a server's (with ``server_names`` as SANs) or a client's."""
    pub = key.public_key()
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_names else ExtendedKeyUsageOID.CLIENT_AUTH
    b = _validity(x509.CertificateBuilder().subject_name(_name(common_name))
                  .issuer_name(ca.subject).public_key(pub), days)
    b = (b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False,
                                      False), critical=True)
         .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
             ca_key.public_key()), critical=False))
    if server_names:
        b = b.add_extension(x509.SubjectAlternativeName(server_names), critical=False)
    return b.sign(ca_key, hashes.SHA256())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_host(name: str) -> bool:
    return bool(_HOST.match(name)) or _is_ip(name)


def server_names(hosts: tuple[str, ...] = (), hostname: str | None = None) -> list[str]:
    """The broker certificate's names: localhost, loopback, this machine, each --host."""
    names = ["localhost", "127.0.0.1", "::1", hostname or socket.gethostname(), *hosts]
    return list(dict.fromkeys(n for n in names if _is_host(n)))


def san_entries(names: list[str]) -> list[x509.GeneralName]:
    """IP-looking names as IP SANs (a client connecting by address checks those)."""
    return [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
            for n in names]


def password_line(username: str, password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """One line of a Mosquitto 2 password file, as ``mosquitto_passwd`` writes it:
    ``user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"{username}:$7${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def acl_text() -> str:
    """The ACL file: the aggregator may do anything under fedge/; every other user (a
    device) writes only its own status, updates and activations and reads the plan,
    control, assets, models, and its own tasks and gradients."""
    lines = ["# fedge ACL (fedge secure init): %u is the client's username = its device id.",
             "# A denied publish is dropped silently; a denied message is not delivered.",
             f"user {AGGREGATOR}", "topic readwrite fedge/#", ""]
    for access, topic in DEVICE_RULES:
        lines += [f"pattern {access} {topic}", f"pattern {access} {topic}/_c/+"]
    return "\n".join(lines) + "\n"


def conf_text(root: Path, port: int) -> str:
    """mosquitto.conf: one TLS listener, client certificates required, passwords and
    the ACL. Paths are absolute: mosquitto resolves relative ones against its cwd."""
    r = Path(root).resolve()
    return f"""\
# Mosquitto 2 configuration for a fedge fleet, written by `fedge secure init`.
# Run the broker:     mosquitto -c {r / "mosquitto.conf"}
# Started as root, mosquitto switches to the user "mosquitto" before it reads the
# files below: chown -R mosquitto {r / "broker"} (or run it as the owner of {r}).
# Clients connect with TLS, a certificate signed by ca.crt and their password:
#   fedge serve  --broker mqtts://HOST:{port} --credentials {r}/credentials/{AGGREGATOR}.json ...
#   fedge device --broker mqtts://HOST:{port} --credentials {r}/credentials/<id>.json ...
per_listener_settings false
allow_anonymous false
password_file {r / "broker" / "passwd"}
acl_file {r / "broker" / "acl"}

listener {port}
cafile {r / "ca.crt"}
certfile {r / "broker" / "server.crt"}
keyfile {r / "broker" / "server.key"}
require_certificate true
"""


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def credentials_json(client: str, password: str) -> dict:
    """A client's credentials file; paths relative to DIR (the file's grandparent)."""
    return {"username": client, "password": password, "cert": f"certs/{client}.crt",
            "key": f"certs/{client}.key", "ca": "ca.crt"}


# --- the orchestrator ------------------------------------------------------------------

PUBLIC, SECRET = 0o644, 0o600


def materials(opts: SecureOptions, hostname: str | None = None) -> dict[str, tuple[bytes, int]]:
    """Every file ``init`` writes, in memory: {path relative to DIR: (bytes, mode)}."""
    days = opts.days
    ca_key = new_key()
    ca = make_ca(ca_key, days)
    files: dict[str, tuple[bytes, int]] = {"ca.crt": (cert_pem(ca), PUBLIC),
                                          "ca.key": (key_pem(ca_key), SECRET)}
    key = new_key()
    names = server_names(opts.hosts, hostname)
    files["broker/server.crt"] = (cert_pem(issue(ca, ca_key, key, names[0], days,
                                                 san_entries(names))), PUBLIC)
    files["broker/server.key"] = (key_pem(key), SECRET)
    passwd = []
    for client in (AGGREGATOR, *opts.devices):
        key = new_key()
        password = secrets.token_urlsafe(24)
        passwd.append(password_line(client, password))
        files[f"certs/{client}.crt"] = (cert_pem(issue(ca, ca_key, key, client, days)), PUBLIC)
        files[f"certs/{client}.key"] = (key_pem(key), SECRET)
        files[f"credentials/{client}.json"] = (
            (json.dumps(credentials_json(client, password), indent=1) + "\n").encode(), SECRET)
    files["broker/passwd"] = (("\n".join(passwd) + "\n").encode(), SECRET)
    files["broker/acl"] = (acl_text().encode(), PUBLIC)
    files["mosquitto.conf"] = (conf_text(opts.out, opts.port).encode(), PUBLIC)
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


def init(opts: SecureOptions) -> dict:
    """Check the options, generate everything, write it to ``opts.out``; a summary."""
    check_options(opts)
    files = materials(opts)
    try:
        write_tree(files, opts.out)
    except OSError as e:
        raise SecureError(f"--out {opts.out}: cannot write: {e}") from None
    clients = [AGGREGATOR, *opts.devices]
    out = Path(opts.out).resolve()
    return {"out": str(out), "conf": str(out / "mosquitto.conf"), "port": opts.port,
            "server_names": server_names(opts.hosts),
            "credentials": {c: str(out / "credentials" / f"{c}.json") for c in clients}}
