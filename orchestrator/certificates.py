"""Self-signed certificates: Ferry's own CA (dmlserver/tls.py) and the CA file that trusts
nothing (prefect_env.py) are both one key's certificate signed by that key."""

from __future__ import annotations

import datetime as dt
from typing import Any


def self_signed(common_name: str, days: float, *, ca: bool = False) -> tuple[Any, Any]:
    """(private key, certificate) of a new P-256 key; `ca`: marked as a CA that may sign
    certificates one level below it (and nothing else)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if ca:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
    return key, builder.sign(key, hashes.SHA256())
