"""Certificates for hpt's mTLS: a cluster CA and leaf certificates that name a node.

``hptctl cert issue`` uses :func:`issue` in the Helm chart's agent init container to give each
agent a certificate for its own node name (CN and DNS SAN), signed by the release's CA; the
controller accepts an agent's registration only for a name its certificate carries. Tests use
the same functions to make CAs, expired and foreign certificates.

Keys are ECDSA P-256; every certificate carries both serverAuth and clientAuth, because an
agent is a client of the controller and a server to its peers (snapshot transfer).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str = "tls") -> tuple[Path, Path]:
        """Write ``<stem>.crt`` and ``<stem>.key`` (mode 0600) into ``directory``."""
        directory.mkdir(parents=True, exist_ok=True)
        cert, key = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert.write_bytes(self.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        return cert, key


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_ca(name: str = "hpt-ca", *, days: float = 3650) -> KeyPair:
    """A self-signed CA certificate valid from now for ``days``."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def issue(
    ca: KeyPair,
    name: str,
    *,
    dns: tuple[str, ...] = (),
    ips: tuple[str, ...] = (),
    days: float = 365,
    not_before: dt.datetime | None = None,
) -> KeyPair:
    """A leaf certificate with subject CN ``name`` and SANs ``name``, ``dns`` and ``ips``.

    Args:
        ca: the signing CA.
        name: the identity: a node name for an agent, a host name for the controller.
        dns, ips: further subject alternative names.
        days: validity from ``not_before``.
        not_before: start of validity (default: 5 minutes ago); tests pass a past date to make
            an expired certificate.

    Raises:
        ValueError: ``name`` is empty or ``days`` is not positive, or an IP is malformed.
    """
    if not name:
        raise ValueError("name must not be empty")
    if not days > 0:
        raise ValueError(f"days ({days!r}) must be > 0")
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
    ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys((name, *dns))]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def load(cert_path: str, key_path: str) -> KeyPair:
    """Read a certificate and key (PEM) from files.

    Raises:
        ValueError: a file cannot be read or is not PEM (the error names the file).
    """
    out = []
    for field, path in (("ca_cert", cert_path), ("ca_key", key_path)):
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{field} ({path!r}) cannot be read: {e}") from e
        if b"-----BEGIN" not in data:
            raise ValueError(f"{field} ({path!r}) is not PEM")
        out.append(data)
    return KeyPair(out[0], out[1])
