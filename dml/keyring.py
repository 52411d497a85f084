"""The DML's signing key as a team holds it: given, exported, imported, rotated.

Where the private key is: `dml_key_file` (FERRY_DML_KEY_FILE or ferry.toml) when set — a
team's one key, shared by every home that deploys to the same hosts (a release engineer's,
a CI runner's) — else the DML's own `keys/dml.key` (made on first build, as before). A
named key file that does not exist is exit 2: a CI runner must never make a key of its own
silently, since hosts pin the first key they see.

A key file written by Ferry (`ferry dml key export`, `rotate`) is a small JSON bundle —
the private key in hex and the key's rotations — so one CI secret carries both; a raw
32-byte key or its 64 hex digits are read too.

Rotation: `rotate` makes a new key and has the old one sign it (`ROTATION` + the new public
key). Hosts pin a key on first contact; a host pinning the old key accepts the new one on
its next contact with Ferry, and only then, by checking that signature (the agent's
`rotated_to`); a host pinning an unrelated key refuses (exit 6) and says how to fix it.
Releases signed before a rotation still verify (the rotations name every older key, each
vouched for by the signature chain), and Ferry re-signs their manifests with the current
key when it sends them to hosts.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from dml import signing
from dml.fsutil import atomic_write, locked
from orchestrator.errors import BadInput, IntegrityError, NotFound

ROTATION = b"ferry-dml-key-rotation\x00"
BUNDLE = "ferry-dml-key/1"


def endorse(old: Ed25519PrivateKey, new_public: bytes) -> bytes:
    return old.sign(ROTATION + new_public)


def read_key_file(path: Path) -> tuple[Ed25519PrivateKey, list[dict[str, str]]]:
    """A key file's private key and rotations (bundle, raw 32 bytes, or 64 hex digits)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise NotFound(
            f"dml_key_file: {path} does not exist (export the team's key with "
            "`ferry dml key export FILE` from a home that has it)"
        ) from None
    except OSError as exc:
        raise BadInput(f"dml_key_file: {path}: {exc.strerror}") from None
    rotations: list[dict[str, str]] = []
    text = raw.strip()
    try:
        if len(raw) == 32:
            private = raw
        elif text.startswith(b"{"):
            doc = json.loads(text)
            if doc.get("format") != BUNDLE:
                raise ValueError(f"format is not {BUNDLE}")
            private = bytes.fromhex(doc["private_key"])
            rotations = [dict(r) for r in doc.get("rotations", [])]
        else:
            private = bytes.fromhex(text.decode())
        if len(private) != 32:
            raise ValueError("not a 32-byte key")
        return Ed25519PrivateKey.from_private_bytes(private), rotations
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise BadInput(
            f"dml_key_file: {path} is not a DML signing key ({exc}): a Ferry key file, "
            "32 raw bytes or 64 hex digits"
        ) from None


def write_key_file(path: Path, key: Ed25519PrivateKey, rotations: list[dict[str, str]]) -> None:
    doc = {
        "format": BUNDLE,
        "key_id": signing.key_id(key.public_key().public_bytes_raw()),
        "private_key": key.private_bytes_raw().hex(),
        "rotations": rotations,
    }
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)


class Keyring:
    """The signing key of one DML, wherever it is kept, and its rotations."""

    def __init__(self, keys_dir: Path, key_file: Path | None = None) -> None:
        self.keys_dir = keys_dir
        self.key_file = key_file
        self.rotations_path = keys_dir / "rotations.json"

    @property
    def where(self) -> Path:
        return self.key_file or self.keys_dir / signing.PRIVATE

    # --- reading ------------------------------------------------------------------------
    def signing_key(self) -> Ed25519PrivateKey:
        """The private key; the DML's own is made on first use, a named file never is."""
        if self.key_file is not None:
            return read_key_file(self.key_file)[0]
        return signing.ensure_keys(self.keys_dir)[0]

    def _existing(self) -> Ed25519PrivateKey:
        """The private key, never made here (the caller holds the keys' lock)."""
        if self.key_file is not None:
            return read_key_file(self.key_file)[0]
        return signing.load_private(self.keys_dir)

    def public(self) -> bytes:
        if self.key_file is not None:
            return self.signing_key().public_key().public_bytes_raw()
        return signing.load_public(self.keys_dir)

    def rotations(self) -> list[dict[str, str]]:
        if self.key_file is not None:
            return read_key_file(self.key_file)[1]
        try:
            return [dict(r) for r in json.loads(self.rotations_path.read_text())]
        except FileNotFoundError:
            return []
        except ValueError:
            raise IntegrityError(f"{self.rotations_path} is not valid JSON") from None

    def trusted(self) -> dict[str, bytes]:
        """key id → public key, for every key whose signatures this DML accepts: the current
        one, and each older one that the chain of signed rotations leads back to."""
        current = self.public()
        keys = {signing.key_id(current): current}
        want, rotations = current, self.rotations()
        for _ in rotations:
            step = next(
                (
                    r
                    for r in rotations
                    if bytes.fromhex(r["new"]) == want
                    and signing.signature_valid(
                        bytes.fromhex(r["old"]), bytes.fromhex(r["signature"]), ROTATION + want
                    )
                ),
                None,
            )
            if step is None:
                break
            want = bytes.fromhex(step["old"])
            keys.setdefault(signing.key_id(want), want)
        return keys

    # --- changing -----------------------------------------------------------------------
    def rotate(self) -> dict[str, Any]:
        """A new key, endorsed by the old one; the old one's releases keep verifying."""
        with locked(self.keys_dir / ".lock"):
            old = self._existing()
            new = Ed25519PrivateKey.generate()
            old_pub = old.public_key().public_bytes_raw()
            new_pub = new.public_key().public_bytes_raw()
            rotation = {
                "old": old_pub.hex(),
                "new": new_pub.hex(),
                "signature": endorse(old, new_pub).hex(),
                "at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            }
            rotations = [*self.rotations(), rotation]
            self._store(new, rotations)
        return {
            "old_key_id": signing.key_id(old_pub),
            "new_key_id": signing.key_id(new_pub),
            "rotations": len(rotations),
            "where": str(self.where),
        }

    def export(self, dest: Path) -> None:
        write_key_file(dest, self.signing_key(), self.rotations())

    def import_(self, src: Path, replace: bool, releases: int) -> dict[str, Any]:
        """Make `src`'s key this DML's own (its `keys/`), with its rotations."""
        key, rotations = read_key_file(src)
        new_pub = key.public_key().public_bytes_raw()
        if self.key_file is not None:
            raise BadInput(
                f"this home's DML key is the file {self.key_file} (dml_key_file): point "
                f"dml_key_file at {src} instead of importing it"
            )
        with locked(self.keys_dir / ".lock"):
            try:
                mine = signing.load_public(self.keys_dir)
            except NotFound:
                mine = None
            if mine is not None and mine != new_pub:
                trusted = Keyring(self.keys_dir, src).trusted()
                if releases and signing.key_id(mine) not in trusted and not replace:
                    raise BadInput(
                        f"this DML already signs with key {signing.key_id(mine)} ({releases} "
                        f"release(s)); {src} holds {signing.key_id(new_pub)}, not a rotation "
                        "of it. Its releases would no longer verify: use --replace to "
                        "import anyway"
                    )
            self._store(key, rotations)
        return {
            "key_id": signing.key_id(new_pub),
            "replaced": signing.key_id(mine) if mine else None,
        }

    def _store(self, key: Ed25519PrivateKey, rotations: list[dict[str, str]]) -> None:
        if self.key_file is not None:
            write_key_file(self.key_file, key, rotations)
            return
        atomic_write(
            self.keys_dir / signing.PUBLIC, key.public_key().public_bytes_raw(), mode=0o644
        )
        atomic_write(self.keys_dir / signing.PRIVATE, key.private_bytes_raw(), mode=0o600)
        atomic_write(self.rotations_path, (json.dumps(rotations, indent=1) + "\n").encode())
