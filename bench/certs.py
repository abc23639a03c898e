"""A self-signed certificate made at bench time, for the TLS scenario and
bench/tls_memory.py: ECDSA P-256 by default (what every server under test is
given), RSA 2048 for comparison. Names: localhost and 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Pem:
    cert: Path
    key: Path

    @property
    def combined(self) -> Path:
        """Certificate then key in one file (HAProxy's ``crt``), written next to them."""
        path = self.cert.with_suffix(".combined.pem")
        if not path.exists():
            path.write_bytes(self.cert.read_bytes() + self.key.read_bytes())
        return path


def make(folder: Path, kind: str = "ecdsa", name: str = "site") -> Pem:
    """Write ``name.pem`` and ``name.key`` into ``folder`` (``kind``: ecdsa or rsa)."""
    if kind == "ecdsa":
        key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = ec.generate_private_key(ec.SECP256R1())
    elif kind == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(kind)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    pem = Pem(folder / f"{name}.pem", folder / f"{name}.key")
    pem.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    pem.key.chmod(0o600)
    return pem
