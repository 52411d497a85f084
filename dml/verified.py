"""A package read back from the DML after every check passed, and streaming its files.

`DML.open()` builds a VerifiedPackage only after the manifest blob matched its name, the
signature verified against the DML's public key, the content matched the package digest
and the archive blob matched the manifest's sha256. Reading files re-checks each file's
sha256 as it streams and the archive's sha256 when the stream ends.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import zstandard

from dml.digest import CHUNK, HashingReader
from orchestrator.errors import IntegrityError


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    mode: int
    sha256: str

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FileEntry:
        return cls(path=d["path"], size=int(d["size"]), mode=int(d["mode"]), sha256=d["sha256"])


@dataclass(frozen=True)
class VerifiedPackage:
    release: str
    name: str
    version: str
    digest: str
    content: dict[str, Any]
    files: list[FileEntry]
    manifest: dict[str, Any]
    manifest_bytes: bytes = field(repr=False)
    manifest_digest: str
    signature: bytes = field(repr=False)
    signature_digest: str
    archive_path: Path
    archive_sha256: str
    archive_size: int
    key_id: str

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.manifest.get("provenance") or {})

    @property
    def units(self) -> list[str]:
        return list(self.content["units"])

    def iter_files(self, wanted: set[str] | None = None) -> Iterator[tuple[FileEntry, IO[bytes]]]:
        """Yield (entry, reader) for files whose sha256 is in `wanted` (all when None).

        Each reader raises IntegrityError at its end if the bytes do not match the entry;
        what the caller leaves unread is read and checked before the next file. After the
        last file the archive's own sha256 is checked, and that every file was present.
        """
        expected = {f.path: f for f in self.files}
        seen: set[str] = set()
        with open(self.archive_path, "rb") as raw:
            hashed = HashingReader(raw)  # type: ignore[arg-type]
            dctx = zstandard.ZstdDecompressor()
            with dctx.stream_reader(hashed, read_across_frames=True, closefd=False) as z:  # type: ignore[arg-type]
                try:
                    tar = tarfile.open(fileobj=z, mode="r|")  # type: ignore[call-overload]
                    for member in tar:
                        entry = self._check_member(member, expected, seen)
                        if wanted is not None and entry.sha256 not in wanted:
                            continue
                        inner = tar.extractfile(member)
                        assert inner is not None
                        reader = _VerifyingReader(self.release, entry, inner)
                        yield entry, reader  # type: ignore[misc]
                        reader.finish()
                    while z.read(CHUNK):
                        pass
                except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
                    raise IntegrityError(
                        f"{self.release}: archive {self.archive_path.name} is unreadable: {exc}"
                    ) from None
            hashed.drain()
        if hashed.sha.hexdigest() != self.archive_sha256 or hashed.size != self.archive_size:
            raise IntegrityError(
                f"{self.release}: archive blob sha256:{self.archive_sha256} changed on disk"
            )
        if missing := sorted(set(expected) - seen):
            raise IntegrityError(
                f"{self.release}: archive lacks {missing[0]} (and {len(missing) - 1} more)"
                if len(missing) > 1
                else f"{self.release}: archive lacks {missing[0]}"
            )

    def unpack(self, dest: Path, wanted: set[str]) -> None:
        """Each file whose sha256 is in `wanted` into dest/<sha256>, once per content, in one
        pass (each checked as it streams: one that fails is never put in place)."""
        dest.mkdir(parents=True, exist_ok=True)
        done: set[str] = set()
        for entry, stream in self.iter_files(wanted):
            if entry.sha256 in done:
                continue  # the same content at another path
            tmp = dest / f".tmp-{entry.sha256}"
            try:
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(stream, out, CHUNK)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(dest / entry.sha256)
            done.add(entry.sha256)

    def iter_file_bytes(self, wanted: set[str] | None = None) -> Iterator[tuple[FileEntry, bytes]]:
        """Like iter_files, with each file's whole content (small files, tests)."""
        for entry, reader in self.iter_files(wanted):
            chunks = []
            while chunk := reader.read(CHUNK):
                chunks.append(chunk)
            yield entry, b"".join(chunks)

    def _check_member(
        self, member: tarfile.TarInfo, expected: dict[str, FileEntry], seen: set[str]
    ) -> FileEntry:
        entry = expected.get(member.name)
        if entry is None or member.name in seen:
            raise IntegrityError(
                f"{self.release}: archive holds {member.name!r}, which the "
                "manifest does not list (or lists once)"
            )
        if not member.isreg() or member.size != entry.size or (member.mode & 0o7777) != entry.mode:
            raise IntegrityError(
                f"{self.release}: archive entry {member.name} differs from "
                "the manifest (type, size or mode)"
            )
        seen.add(member.name)
        return entry


class _VerifyingReader:
    def __init__(self, release: str, entry: FileEntry, inner: IO[bytes]) -> None:
        self.release, self.entry, self.inner = release, entry, inner
        self.sha = hashlib.sha256()
        self.size = 0
        self.checked = False

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        if data:
            self.sha.update(data)
            self.size += len(data)
        elif not self.checked:
            self._check()
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def finish(self) -> None:
        while self.read(CHUNK):
            pass

    def _check(self) -> None:
        self.checked = True
        if self.size != self.entry.size or self.sha.hexdigest() != self.entry.sha256:
            raise IntegrityError(
                f"{self.release}: file {self.entry.path} does not match its sha256 in the manifest"
            )
