"""The text files ``fedge secure`` writes for Mosquitto and the clients: the password
line, the ACL, ``mosquitto.conf`` and a client's credentials JSON. Pure functions.

Identity (docs/security.md): on the devices' listener the certificate is the identity
(``use_identity_as_username``: its CN is the username the ACL sees, whatever the
client sends) and the username is the client id (``use_username_as_clientid``), so a
device can neither act under another's ACL nor take over another's session. The
aggregator and its workers share one identity but need several sessions, so they
have a listener of their own where client ids are free and the password is checked;
only the aggregator has a password.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

AGGREGATOR = "aggregator"  # the aggregator's id and username; no device may take it
DASHBOARD = "dashboard"  # fedge dashboard's username: it may read the job's topics only
PBKDF2_ITERATIONS = 101  # mosquitto_passwd's default for $7$ hashes
SALT_BYTES = 12
MIB = 1 << 20
# max_packet_size is the whole packet: the payload plus the topic (up to 64 KiB), the
# fixed header and MQTT 5 properties. Past it Mosquitto disconnects the sender before
# reading the payload; between the two limits it reads the message and drops it.
PACKET_SLACK = 128 * 1024

# Per-device ACL rules: (access, topic), {id} the device id. Frames larger than the
# transport's max_payload travel as chunks on <topic>/_c/<index>
# (device_runtime.transport.base), and a subscription to a topic also covers those, so
# each rule comes with its "<topic>/_c/+" twin.
DEVICE_RULES: tuple[tuple[str, str], ...] = (
    ("write", "fedge/+/devices/{id}/status"),
    ("write", "fedge/+/round/+/update/{id}"),
    ("write", "fedge/+/round/+/acts/{id}"),
    ("read", "fedge/+/plan"),
    ("read", "fedge/+/control"),
    ("read", "fedge/+/heartbeat"),
    ("read", "fedge/+/asset/+"),
    ("read", "fedge/+/round/+/model/+"),
    ("read", "fedge/+/round/+/sync/+"),
    ("read", "fedge/+/round/+/task/{id}"),
    ("read", "fedge/+/round/+/grad/{id}"),
    ("read", "fedge/+/release/+/+"),  # an export version's signed files (fedge rollout)
    ("read", "fedge/+/rollout/{id}"),  # its own rollout command
)


@dataclass(frozen=True)
class Limits:
    """What the broker holds per message and per client (mosquitto.conf)."""

    max_message: int = 64 * MIB  # the largest payload: message_size_limit
    max_queued_messages: int = 10_000  # per client, beyond those in flight
    max_queued_bytes: int = 0  # per client; 0: 4 x max_message

    @property
    def queued_bytes(self) -> int:
        return self.max_queued_bytes or 4 * self.max_message


def password_line(username: str, password: str, salt: bytes | None = None,
                  iterations: int = PBKDF2_ITERATIONS) -> str:
    """One line of a Mosquitto 2 password file, as ``mosquitto_passwd`` writes it:
    ``user:$7$<iterations>$<base64 salt>$<base64 PBKDF2-HMAC-SHA512, 64 bytes>``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return (f"{username}:$7${iterations}${base64.b64encode(salt).decode()}"
            f"${base64.b64encode(digest).decode()}")


def acl_text(devices: list[str] | tuple[str, ...]) -> str:
    """The ACL file: the aggregator may do anything under fedge/, the dashboard may
    only read there; each listed device writes only its own status, updates and
    activations and reads the plan, control, assets, models, and its own tasks and
    gradients. A user not listed (a revoked device) may do nothing."""
    lines = ["# fedge ACL (fedge secure): a user is a certificate's CN, i.e. a device id.",
             "# A denied publish is dropped silently; a denied message is not delivered.",
             f"user {AGGREGATOR}", "topic readwrite fedge/#", "",
             f"user {DASHBOARD}", "topic read fedge/#", ""]
    for d in sorted(devices):
        lines.append(f"user {d}")
        for access, topic in DEVICE_RULES:
            t = topic.format(id=d)
            lines += [f"topic {access} {t}", f"topic {access} {t}/_c/+"]
        lines.append("")
    return "\n".join(lines)


def _tls_listener(r: Path, port: int) -> str:
    return (f"listener {port}\ncafile {r / 'ca.crt'}\ncertfile {r / 'broker' / 'server.crt'}\n"
            f"keyfile {r / 'broker' / 'server.key'}\ncrlfile {r / 'broker' / 'crl.pem'}\n"
            "require_certificate true\n")


def current_user() -> str | None:
    """The name of the user this process runs as (None where there is no passwd)."""
    try:
        import pwd

        return pwd.getpwuid(os.geteuid()).pw_name
    except (ImportError, AttributeError, KeyError):  # not POSIX, or a uid without a name
        return None


def conf_text(root: Path, port: int, aggregator_port: int, limits: Limits,
              owner: str | None = None) -> str:
    """mosquitto.conf: the devices' TLS listener (identity from the certificate), the
    aggregator's (certificate and password), the ACL and the size limits. Paths are
    absolute: mosquitto resolves relative ones against its cwd. ``owner`` (the user
    writing the files) is the ``user`` a root-started mosquitto runs as: its default,
    "mosquitto", can read neither 0600 files nor a 0700 home (README's command, as
    root, failed with "Unable to open pwfile")."""
    r = Path(root).resolve()
    user = f"user {owner}\n" if owner else ""
    return f"""\
# Mosquitto 2 configuration for a fedge fleet, written by `fedge secure init`.
# Run the broker:     mosquitto -c {r / "mosquitto.conf"}
# Started as root, mosquitto switches to the "user" below before it reads the files
# named here: the one who wrote them (its default, "mosquitto", can read neither
# these 0600 files nor a home folder); started by anyone else, it ignores the line.
# For a root-started broker that runs as "mosquitto": chown -R mosquitto
# {r / "broker"}, make the folders above it readable and say "user mosquitto" below.
# After `fedge secure add` or `revoke`, send it a SIGHUP: it re-reads the password
# file, the ACL and the CRL (mosquitto 2.0.11; a client already connected keeps its
# connection, but loses its ACL).
# The aggregator (and its workers) on port {aggregator_port}, devices on port {port}:
#   fedge serve  --broker mqtts://HOST:{aggregator_port} \
#       --credentials {r}/credentials/{AGGREGATOR}.json ...
#   fedge device --broker mqtts://HOST:{port} --credentials {r}/credentials/<id>.json ...
{user}per_listener_settings false
allow_anonymous false
password_file {r / "broker" / "passwd"}
acl_file {r / "broker" / "acl"}

# Sizes (fedge secure init --max-message): a larger publish is dropped, one past
# max_packet_size disconnects its sender; a client's queue is capped too.
message_size_limit {limits.max_message}
max_packet_size {limits.max_message + PACKET_SLACK}
max_queued_messages {limits.max_queued_messages}
max_queued_bytes {limits.queued_bytes}

# Tasks and acknowledgements leave at once: with Nagle's algorithm a small packet
# after an unacknowledged one waits for the peer's delayed ACK (up to 40 ms on Linux).
set_tcp_nodelay true

# Devices: the certificate's CN is the username (any username or password sent is
# ignored) and the username is the client id.
{_tls_listener(r, port)}use_identity_as_username true
use_username_as_clientid true

# The aggregator and its workers: a fleet certificate and the aggregator's password.
{_tls_listener(r, aggregator_port)}"""


def client_payload(limits: Limits) -> int | None:
    """The max_payload a client of this broker writes in its credentials: what the
    broker takes, capped at 1 MiB (a 356 KB model in one message, not three chunks of
    128 KiB: 35% of a 16-device round's time went to chunking, docs/results/field.md);
    None below 4 KiB, where no chunk fits (the clients keep their default)."""
    payload = min(limits.max_message, MIB)
    return payload if payload >= 4096 else None


def credentials_json(client: str, password: str | None, tls: bool,
                     signing_key: str | None, max_payload: int | None = None) -> bytes:
    """A client's credentials file; paths relative to DIR (the file's grandparent). A
    device trusts the aggregator's key (``trust``); the aggregator checks the devices'
    (``registry``); the dashboard, which signs nothing, needs both to check what it
    shows. Devices have no password: their certificate is their identity."""
    doc: dict = {"username": client}
    if password is not None:
        doc["password"] = password
    if tls:
        doc.update(cert=f"certs/{client}.crt", key=f"certs/{client}.key", ca="ca.crt")
    if signing_key is not None:
        doc["signing_key"] = signing_key
    if client in (DASHBOARD, AGGREGATOR):
        doc["registry"] = "registry.json"
    if client != AGGREGATOR:
        doc["trust"] = "server.pub"
    if max_payload is not None:
        doc["max_payload"] = max_payload
    return (json.dumps(doc, indent=1) + "\n").encode()
