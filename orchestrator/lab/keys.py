"""ed25519 keys in OpenSSH's file format, made in-process.

Spawning `ssh-keygen` for each of 200 hosts costs seconds; `cryptography` writes the same
files in microseconds, and both OpenSSH and paramiko read them.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)


def write_keypair(path: Path, comment: str) -> str:
    """Write `path` (0600, as sshd and ssh insist) and `path.pub`; return the public line."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(Encoding.PEM, PrivateFormat.OpenSSH, NoEncryption())
    public = key.public_key().public_bytes(Encoding.OpenSSH, PublicFormat.OpenSSH).decode()
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private)
    path.with_name(path.name + ".pub").write_text(f"{public} {comment}\n")
    return public
