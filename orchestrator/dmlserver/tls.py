"""Ferry's own certificate authority and the DML server's certificate (Act).

The CA lives under the Ferry home (`pki/ca.pem`, `pki/ca.key`, the key mode 0600). An agent
pins `ca.pem` at install and trusts no other CA, so a server certificate swapped for one
any other authority signed (a public one included) is refused by the agent's TLS.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

CA_DAYS = 3650
SERVER_DAYS = 825


def pki_dir(home: Path) -> Path:
    return home / "pki"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def ensure_ca(home: Path) -> Path:
    """The CA certificate (made on first use); its key never leaves the home."""
    from cryptography.hazmat.primitives import serialization

    from orchestrator.certificates import self_signed

    d = pki_dir(home)
    cert_path, key_path = d / "ca.pem", d / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path
    key, cert = self_signed("Ferry DML CA", CA_DAYS, ca=True)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_path, pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def server_certificate(home: Path, names: list[str]) -> tuple[Path, Path]:
    """A certificate for the server's addresses or names, signed by the CA: (cert, key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ensure_ca(home)
    d = pki_dir(home)
    ca_key = serialization.load_pem_private_key((d / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((d / "ca.pem").read_bytes())
    alt: list[x509.GeneralName] = []
    for n in dict.fromkeys([*names, "127.0.0.1", "localhost"]):
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            alt.append(x509.DNSName(n))
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = d / "server.pem", d / "server.key"
    _write_private(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
