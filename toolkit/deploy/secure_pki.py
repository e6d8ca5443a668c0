"""The fleet's X.509 pieces for ``fedge secure``: keys, the CA, certificates, the CRL.

Pure functions over ``cryptography`` objects (no files): ``toolkit.deploy.secure`` builds a
fleet from them, ``toolkit.deploy.secure_fleet`` adds and revokes one device later.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LABEL = r"[A-Za-z0-9][A-Za-z0-9-]{0,62}"
_HOST = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")  # a DNS name (an IP is checked apart)


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


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_host(name: str) -> bool:
    return bool(_HOST.match(name)) or is_ip(name)


def server_names(hosts: tuple[str, ...] = (), hostname: str | None = None) -> list[str]:
    """The broker certificate's names: localhost, loopback, this machine, each --host."""
    names = ["localhost", "127.0.0.1", "::1", hostname or socket.gethostname(), *hosts]
    return list(dict.fromkeys(n for n in names if is_host(n)))


def san_entries(names: list[str]) -> list[x509.GeneralName]:
    """IP-looking names as IP SANs (a client connecting by address checks those)."""
    return [x509.IPAddress(ipaddress.ip_address(n)) if is_ip(n) else x509.DNSName(n)
            for n in names]


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_crl(ca: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, serials: list[int],
             days: int) -> x509.CertificateRevocationList:
    """The CA's revocation list with ``serials``. Its next update lies ``days`` ahead:
    OpenSSL refuses every client once a CRL has expired, so it must outlive the
    certificates (``fedge secure revoke`` writes a fresh one each time)."""
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
         .last_update(now - dt.timedelta(hours=1)).next_update(now + dt.timedelta(days=days)))
    for serial in sorted(set(serials)):
        b = b.add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial)
                                      .revocation_date(now).build())
    return b.sign(ca_key, hashes.SHA256())


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.PEM)


def revoked_serials(pem: bytes) -> list[int]:
    return [r.serial_number for r in x509.load_pem_x509_crl(pem)]


def load_ca(cert_pem_bytes: bytes, key_pem_bytes: bytes
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = serialization.load_pem_private_key(key_pem_bytes, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"expected an EC private key, got {type(key).__name__}")
    return x509.load_pem_x509_certificate(cert_pem_bytes), key
