"""The DML's ed25519 key pair: made once, kept in `keys/`, pinned by hosts by its public key.

`keys/dml.key` holds the raw 32-byte private key (mode 0600); `keys/dml.pub` the raw 32-byte
public key. The key id is the first 16 hex digits of sha256(public key). Signatures are raw
64-byte ed25519 signatures over the exact bytes of a manifest file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from dml.fsutil import atomic_write, locked
from orchestrator.errors import IntegrityError, NotFound

PRIVATE = "dml.key"
PUBLIC = "dml.pub"


def key_id(public: bytes) -> str:
    return hashlib.sha256(public).hexdigest()[:16]


def ensure_keys(keys_dir: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The DML's private key, made now if there is none; (key, created)."""
    with locked(keys_dir / ".lock"):
        try:
            return load_private(keys_dir), False
        except NotFound:
            pass
        key = Ed25519PrivateKey.generate()
        atomic_write(keys_dir / PUBLIC, key.public_key().public_bytes_raw(), mode=0o644)
        atomic_write(keys_dir / PRIVATE, key.private_bytes_raw(), mode=0o600)
        return key, True


def load_private(keys_dir: Path) -> Ed25519PrivateKey:
    path = keys_dir / PRIVATE
    raw = _read_raw_key(path, "signing key")
    key = Ed25519PrivateKey.from_private_bytes(raw)
    if (keys_dir / PUBLIC).exists() and load_public(
        keys_dir
    ) != key.public_key().public_bytes_raw():
        raise IntegrityError(f"{keys_dir / PUBLIC} does not belong to {path}")
    return key


def load_public(keys_dir: Path) -> bytes:
    return _read_raw_key(keys_dir / PUBLIC, "public key")


def _read_raw_key(path: Path, what: str) -> bytes:
    """A raw 32-byte ed25519 key file, or an error naming it and the fix."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no DML {what} at {path} (run `ferry dml keygen`)") from None
    if len(raw) != 32:
        raise IntegrityError(f"DML {what} {path} is not a raw 32-byte ed25519 key")
    return raw


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def signature_valid(public: bytes, signature: bytes, data: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True
