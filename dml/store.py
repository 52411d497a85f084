"""The DML store: content-addressed, write-once, signed, verified on every read.

Layout under the DML root:

    blobs/sha256/ab/cdef…           archives, manifests, signatures (named by their sha256)
    releases/<name>/<version>.json  the index: which manifest, signature, archive blobs
    keys/dml.key, keys/dml.pub      the ed25519 key pair (raw 32 bytes each; key 0600)
    locks/                          fcntl locks: one per release, one for the whole store
    tmp/                            archives being built (removed on failure; gc sweeps)

Every file appears atomically. A release's index is written last, under the release's
lock, so a reader either sees no release or a complete one. Storing under an existing
name@version is a no-op for the same package digest and refused for any other. Writers
hold the store lock shared, `gc` holds it exclusively, so gc never sees half a store.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dml import signing
from dml.digest import bytes_digest, content_digest, hash_file, hex_of
from dml.fsutil import atomic_write, locked, move_into_place
from dml.image import image_index, verify_blobs
from dml.keyring import Keyring
from dml.package import ARCHIVE_FORMAT, BuiltArchive
from dml.ref import ReleaseRef
from dml.verified import FileEntry, VerifiedPackage
from orchestrator.errors import BadInput, IntegrityError, NotFound

STALE_TMP_SECONDS = 3600


class WriteOnceRefused(BadInput):
    """A release version already holds a different package; versions are never reused."""


@dataclass(frozen=True)
class Stored:
    release: str
    digest: str
    new: bool
    manifest_digest: str
    signature_digest: str
    archive_digest: str
    archive_size: int
    key_id: str


@dataclass
class Report:
    """What verify or gc found; `problems` are {item, problem} records."""

    checked: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unreferenced: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problems": self.problems,
            "unreferenced": self.unreferenced,
            "removed": self.removed,
        }


# blobs hashed in full, by file identity (path, inode, size, mtime, ctime): a deploy opens its
# package up to three times (plan, run, check-in), and every deploy of a release opens it
# again. A write-once blob whose identity is unchanged since it was hashed is not read
# again: in this process (_HASHED), nor in a later one (the DML's `hashed/` stamps, see
# DML.hashed_unchanged). Writing a file moves its ctime, which no user can set back.
# `ferry dml verify` always re-reads every blob.
_HASHED: dict[tuple[str, int, int, int, int], str] = {}


def _identity(path: Path) -> tuple[str, int, int, int, int]:
    st = path.stat()
    return (str(path), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _stamp(ident: tuple[str, int, int, int, int]) -> str:
    """A `hashed/` stamp's text: the identity without the path (the stamp is named by it)."""
    return " ".join(str(v) for v in ident[1:])


class DML:
    def __init__(self, root: Path, key_file: Path | None = None) -> None:
        self.root = Path(root)
        self.blobs = self.root / "blobs" / "sha256"
        self.releases_dir = self.root / "releases"
        self.keys_dir = self.root / "keys"
        self.locks_dir = self.root / "locks"
        self.tmp_dir = self.root / "tmp"
        # every package's files by sha256, unpacked when it is stored: a push frames the few
        # objects an incremental release needs from here instead of reading the whole
        # archive. Never trusted: each object is hashed again whenever it is read
        # (orchestrator.objects), and one that fails is read from the archive instead.
        self.objects_dir = self.root / "objects"
        # hashed/<sha256 hex>: the identity a blob had when it was last hashed in full and
        # matched its name (DML.hashed_unchanged)
        self.hashed_dir = self.root / "hashed"
        self.keyring = Keyring(self.keys_dir, key_file)

    @classmethod
    def from_settings(cls) -> DML:
        from orchestrator.settings import get_settings

        settings = get_settings()
        return cls(settings.dml_dir, settings.dml_key_file)

    # --- blobs already hashed ----------------------------------------------------------

    def hashed_unchanged(self, path: Path, sha: str) -> bool:
        """True when the blob at `path` was hashed in full to `sha` and its identity has not
        changed since. Skipping the re-read costs no safety on a host: whatever a deploy
        reads from the archive is checked file by file and in full as it streams
        (VerifiedPackage.iter_files), and each host hashes every object it receives against
        the signed manifest. What it gives up is finding, at open, a blob altered without
        its ctime moving (the disk's own corruption, or a writer able to forge a stamp too):
        `ferry dml verify` finds those, and drops their stamps."""
        try:
            ident = _identity(path)
        except OSError:
            return False
        if _HASHED.get(ident) == sha:
            return True
        try:
            stamp = (self.hashed_dir / sha).read_text()
        except (OSError, ValueError):
            return False
        if stamp.split() != _stamp(ident).split():
            return False
        _HASHED[ident] = sha
        return True

    def remember_hashed(self, path: Path, sha: str) -> None:
        """`path` was just hashed in full to `sha`: its identity now, for later opens (a DML
        this user cannot write keeps the memory of this process only)."""
        try:
            ident = _identity(path)
        except OSError:
            return
        _HASHED[ident] = sha
        try:
            self.hashed_dir.mkdir(exist_ok=True)
            tmp = self.hashed_dir / f".tmp-{sha}-{os.getpid()}"
            tmp.write_text(_stamp(ident))
            os.replace(tmp, self.hashed_dir / sha)
        except OSError:
            pass

    def forget_hashed(self, sha: str) -> None:
        """The blob named `sha` failed a hash, or is gone: no open may skip hashing it."""
        for ident in [i for i, v in _HASHED.items() if v == sha]:
            del _HASHED[ident]
        try:
            (self.hashed_dir / sha).unlink(missing_ok=True)
        except OSError:
            pass

    # --- keys -----------------------------------------------------------------------

    def ensure_keys(self) -> bool:
        """Make the signing key pair if there is none; True when it was made now.
        A named key file (dml_key_file) is never made: it must exist."""
        if self.keyring.key_file is not None:
            self.keyring.signing_key()
            return False
        return signing.ensure_keys(self.keys_dir)[1]

    def public_key_bytes(self) -> bytes:
        return self.keyring.public()

    def rotations(self) -> list[dict[str, str]]:
        return self.keyring.rotations()

    def signature_for_hosts(self, package: VerifiedPackage) -> bytes:
        """The manifest's signature by the current key (hosts accept no other for a new
        release): the stored one, or — for a release signed before a rotation — a new one."""
        public = self.public_key_bytes()
        if signing.signature_valid(public, package.signature, package.manifest_bytes):
            return package.signature
        return signing.sign(self.keyring.signing_key(), package.manifest_bytes)

    def key_id(self) -> str:
        return signing.key_id(self.public_key_bytes())

    # --- paths ----------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        h = hex_of(digest)
        return self.blobs / h[:2] / h[2:]

    def index_path(self, release: str) -> Path:
        ref = ReleaseRef.parse(release)  # refused before it names a path
        return self.releases_dir / ref.name / f"{ref.version}.json"

    def releases(self) -> list[str]:
        if not self.releases_dir.is_dir():
            return []
        found = [
            f"{d.name}@{f.name[: -len('.json')]}"
            for d in self.releases_dir.iterdir()
            if d.is_dir()
            for f in d.iterdir()
            if f.name.endswith(".json") and not f.name.startswith(".")
        ]
        return sorted(found)

    def has(self, release: str) -> bool:
        return self.index_path(release).exists()

    def index(self, release: str) -> dict[str, Any]:
        path = self.index_path(release)
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            raise NotFound(f"release {release} is not in the DML at {self.root}") from None
        except ValueError:
            raise IntegrityError(f"{release}: index {path} is not valid JSON") from None
        if not isinstance(data, dict) or data.get("release") != release:
            raise IntegrityError(f"{release}: index {path} does not describe {release}")
        return data

    # --- writing --------------------------------------------------------------------

    def store(self, built: BuiltArchive, provenance: dict[str, Any]) -> Stored:
        """Sign and store a built archive under its release; consumes `built.archive_path`."""
        release = built.content["release"]
        try:
            key = self.keyring.signing_key()
            kid = signing.key_id(key.public_key().public_bytes_raw())
            with (
                locked(self.locks_dir / "store.lock", shared=True),
                locked(self.locks_dir / f"{release}.lock"),
            ):
                if self.has(release):
                    return self._existing(release, built.digest)
                manifest = {
                    "digest": built.digest,
                    "content": built.content,
                    "archive": {
                        "sha256": built.archive_sha256,
                        "size": built.archive_size,
                        "format": ARCHIVE_FORMAT,
                    },
                    "provenance": provenance,
                    "key_id": kid,
                }
                manifest_bytes = (
                    json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False).encode()
                    + b"\n"
                )
                archive_digest = "sha256:" + built.archive_sha256
                archive_path = self.blob_path(archive_digest)
                if move_into_place(built.archive_path, archive_path):
                    # its bytes were hashed on their way to disk: the first open need not
                    # read them again (hashed_unchanged)
                    self.remember_hashed(archive_path, built.archive_sha256)
                manifest_digest = self._put_blob(manifest_bytes)
                signature_digest = self._put_blob(signing.sign(key, manifest_bytes))
                index = {
                    "release": release,
                    "digest": built.digest,
                    "manifest": manifest_digest,
                    "signature": signature_digest,
                    "archive": archive_digest,
                    "key_id": kid,
                    **image_index(built.content),
                    "stored_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                }
                atomic_write(
                    self.index_path(release),
                    json.dumps(index, sort_keys=True, indent=1).encode() + b"\n",
                )
                self._unpack_objects(release)
                return Stored(
                    release,
                    built.digest,
                    True,
                    manifest_digest,
                    signature_digest,
                    archive_digest,
                    built.archive_size,
                    kid,
                )
        finally:
            built.archive_path.unlink(missing_ok=True)

    def _existing(self, release: str, digest: str) -> Stored:
        idx = self.index(release)
        if idx.get("digest") != digest:
            raise WriteOnceRefused(
                f"{release} is already in the DML as {idx.get('digest')}; this build is "
                f"{digest}. Release versions are write-once: give the build a new version "
                "(--version)",
                details={"release": release, "stored": idx.get("digest"), "built": digest},
            )
        pkg = self.open(release, verify_archive=False)
        return Stored(
            release,
            digest,
            False,
            pkg.manifest_digest,
            pkg.signature_digest,
            "sha256:" + pkg.archive_sha256,
            pkg.archive_size,
            pkg.key_id,
        )

    def _unpack_objects(self, release: str) -> None:
        """Each file of the just-stored package into objects/<sha256> (objects other releases
        share are there already). One pass over the archive, which checks each file and the
        archive's sha256 as it streams: opening it does not hash it first. Not fsynced: the
        archive is the record, objects are a cache checked at every read."""
        pkg = self.open(release, verify_archive=False)
        have = set(os.listdir(self.objects_dir)) if self.objects_dir.is_dir() else set()
        missing = {f.sha256 for f in pkg.files} - have
        if missing:
            pkg.unpack(self.objects_dir, missing)

    def _put_blob(self, data: bytes) -> str:
        digest = bytes_digest(data)
        path = self.blob_path(digest)
        if not path.exists():
            atomic_write(path, data)
        return digest

    # --- reading --------------------------------------------------------------------

    def _read_blob(self, release: str, role: str, digest: str) -> bytes:
        try:
            data = self.blob_path(digest).read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{release}: {role} blob {digest} is missing") from None
        if bytes_digest(data) != digest:
            raise IntegrityError(
                f"{release}: {role} blob {digest} is corrupt "
                f"(its bytes hash to {bytes_digest(data)})"
            )
        return data

    def open(self, release: str, verify_archive: bool = True) -> VerifiedPackage:
        """The release's package, after verifying manifest, signature, digest and archive."""
        idx = self.index(release)
        try:
            manifest_digest, sig_digest = str(idx["manifest"]), str(idx["signature"])
            archive_digest = str(idx["archive"])
            hex_of(manifest_digest), hex_of(sig_digest), hex_of(archive_digest)
        except (KeyError, ValueError):
            raise IntegrityError(
                f"{release}: index {self.index_path(release)} is damaged"
            ) from None
        manifest_bytes = self._read_blob(release, "manifest", manifest_digest)
        signature = self._read_blob(release, "signature", sig_digest)
        # signed by the current key, or by an older one this DML rotated away from
        trusted = self.keyring.trusted()
        public = trusted.get(str(idx.get("key_id"))) or self.public_key_bytes()
        if not signing.signature_valid(public, signature, manifest_bytes):
            raise IntegrityError(
                f"{release}: manifest signature does not verify with the DML "
                f"key {signing.key_id(public)}"
            )
        try:
            manifest = json.loads(manifest_bytes)
            content = manifest["content"]
            archive = manifest["archive"]
            files = [FileEntry.from_dict(f) for f in content["files"]]
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{release}: manifest {manifest_digest} is malformed") from None
        digest = content_digest(content)
        if not (digest == manifest.get("digest") == idx.get("digest")):
            raise IntegrityError(f"{release}: manifest content does not match its digest")
        if content.get("release") != release:
            raise IntegrityError(f"{release}: manifest is for {content.get('release')}")
        if "sha256:" + str(archive.get("sha256")) != archive_digest:
            raise IntegrityError(
                f"{release}: index names archive {archive_digest}, "
                f"manifest says sha256:{archive.get('sha256')}"
            )
        path = self.blob_path(archive_digest)
        if not path.exists():
            raise IntegrityError(f"{release}: archive blob {archive_digest} is missing")
        if verify_archive and not self.hashed_unchanged(path, archive["sha256"]):
            sha, size = hash_file(path)
            if sha == archive["sha256"] and size == archive["size"]:
                self.remember_hashed(path, sha)
            if sha != archive["sha256"] or size != archive["size"]:
                raise IntegrityError(
                    f"{release}: archive blob {archive_digest} is corrupt "
                    f"(its bytes hash to sha256:{sha})"
                )
        if verify_archive and content.get("images"):
            verify_blobs(
                release, content, self.blob_path, self.hashed_unchanged, self.remember_hashed
            )
        return VerifiedPackage(
            release=release,
            name=content["name"],
            version=content["version"],
            digest=digest,
            content=content,
            files=files,
            manifest=manifest,
            manifest_bytes=manifest_bytes,
            manifest_digest=manifest_digest,
            signature=signature,
            signature_digest=sig_digest,
            archive_path=path,
            archive_sha256=archive["sha256"],
            archive_size=archive["size"],
            key_id=str(manifest.get("key_id")),
        )

    # --- whole-store checks ---------------------------------------------------------

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        if not self.blobs.is_dir():
            return
        for d in sorted(self.blobs.iterdir()):
            if d.is_dir() and len(d.name) == 2:
                for f in sorted(d.iterdir()):
                    if not f.name.startswith("."):
                        yield f"sha256:{d.name}{f.name}", f

    def verify(self, deep: bool = False) -> Report:
        """Re-hash every blob, verify every release (signature, digests); deep: every file."""
        report = Report()
        roles = self._roles(report)
        blobs = 0
        for digest, path in self.iter_blobs():
            blobs += 1
            sha, _ = hash_file(path)
            if "sha256:" + sha == digest:
                self.remember_hashed(path, sha)
            else:
                self.forget_hashed(hex_of(digest))
                what = roles.get(digest, "unreferenced blob")
                report.problems.append(
                    {
                        "item": f"blob {digest}",
                        "problem": f"corrupt ({what}): its bytes hash to sha256:{sha}",
                    }
                )
        for release in self.releases():
            try:
                pkg = self.open(release, verify_archive=False)
                if deep:
                    for _entry, reader in pkg.iter_files():
                        reader.finish()  # type: ignore[attr-defined]
            except IntegrityError as exc:
                report.problems.append({"item": release, "problem": exc.message})
        report.checked = {"blobs": blobs, "releases": len(self.releases())}
        return report

    def _roles(self, report: Report) -> dict[str, str]:
        """digest → 'archive of shop@1.4.0', for every blob some index names."""
        roles: dict[str, str] = {}
        for release in self.releases():
            try:
                idx = self.index(release)
            except IntegrityError as exc:
                report.problems.append({"item": release, "problem": exc.message})
                continue
            for role in ("manifest", "signature", "archive"):
                if isinstance(idx.get(role), str):
                    roles[idx[role]] = f"{role} of {release}"
            for digest in idx.get("images") or []:
                roles.setdefault(str(digest), f"image blob of {release}")
        return roles

    def gc(self, keep: set[str] | None = None, delete: bool = False) -> Report:
        """Blobs no release index (and nothing in `keep`) references; removed when `delete`."""
        report = Report()
        with locked(self.locks_dir / "store.lock"):
            referenced = set(self._roles(report)) | set(keep or ())
            blobs = 0
            for digest, path in self.iter_blobs():
                blobs += 1
                if digest not in referenced:
                    report.unreferenced.append(digest)
                    if delete:
                        path.unlink()
                        self.forget_hashed(hex_of(digest))
                        report.removed.append(digest)
            for name in self._unlisted_objects():
                report.unreferenced.append(f"object {name}")
                if delete:
                    (self.objects_dir / name).unlink(missing_ok=True)
                    report.removed.append(f"object {name}")
            cutoff = time.time() - STALE_TMP_SECONDS
            for stale in self._temp_files():
                if stale.stat().st_mtime < cutoff:
                    report.unreferenced.append(str(stale))
                    if delete:
                        stale.unlink(missing_ok=True)
                        report.removed.append(str(stale))
            report.checked = {"blobs": blobs, "releases": len(self.releases())}
        return report

    def _unlisted_objects(self) -> list[str]:
        """Objects no stored release lists (unpacked for a release since removed)."""
        if not self.objects_dir.is_dir():
            return []
        listed: set[str] = set()
        for release in self.releases():
            try:
                listed |= {f.sha256 for f in self.open(release, verify_archive=False).files}
            except IntegrityError:
                return []  # a release that cannot be read: keep every object
        names = sorted(os.listdir(self.objects_dir))
        return [n for n in names if not n.startswith(".") and n not in listed]

    def _temp_files(self) -> Iterator[Path]:
        if self.tmp_dir.is_dir():
            yield from (p for p in self.tmp_dir.iterdir() if p.is_file())
        for top in (self.blobs, self.releases_dir, self.objects_dir, self.hashed_dir):
            if top.is_dir():
                yield from top.rglob(".tmp-*")
