"""Unpacking an archive without ever writing outside the destination.

`check_member(name, kind, linkname)` is the pure rule; `safe_extract` applies it to every
entry of a tar or tar+zstd archive before writing that entry. Refused: absolute names,
`..` components, backslashes, NUL, duplicate names, devices/FIFOs, symlinks whose target
leaves the destination (absolute, climbing out, or via other symlinks), hardlinks to
anything but a regular file extracted earlier, and writing through a symlink. Modes keep
only rwx bits. On any refusal everything this call created is removed and UnsafeArchive
(exit 6) is raised.
"""

from __future__ import annotations

import os
import posixpath
import shutil
import tarfile
from pathlib import Path, PurePosixPath
from typing import IO, Literal

import zstandard

from orchestrator.errors import IntegrityError

Kind = Literal["file", "dir", "symlink", "hardlink", "other"]
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class UnsafeArchive(IntegrityError):
    """An archive entry would land (or point) outside the destination, or is not allowed."""


def check_member(name: str, kind: Kind, linkname: str = "") -> PurePosixPath:
    """The entry's path relative to the destination, or UnsafeArchive saying why not."""
    if kind == "other":
        raise UnsafeArchive(f"{name!r}: devices, FIFOs and other special files are refused")
    rel = _relative(name, "entry")
    if kind == "symlink":
        if not linkname or linkname.startswith("/"):
            raise UnsafeArchive(f"{name!r}: symlink to absolute path {linkname!r} is refused")
        if "\0" in linkname or "\\" in linkname:
            raise UnsafeArchive(f"{name!r}: symlink target {linkname!r} is malformed")
        joined = posixpath.normpath(posixpath.join(str(rel.parent), linkname))
        if joined == ".." or joined.startswith("../"):
            raise UnsafeArchive(f"{name!r}: symlink to {linkname!r} points outside the target")
    elif kind == "hardlink":
        _relative(linkname, f"hardlink {name!r} target")
    return rel


def _relative(name: str, what: str) -> PurePosixPath:
    if not name or "\0" in name or "\\" in name:
        raise UnsafeArchive(f"{what} {name!r}: malformed name")
    if name.startswith("/"):
        raise UnsafeArchive(f"{what} {name!r}: absolute paths are refused")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{what} {name!r}: '..' would climb out of the target")
    if not parts:
        raise UnsafeArchive(f"{what} {name!r}: names nothing")
    return PurePosixPath(*parts)


def _kind(m: tarfile.TarInfo) -> Kind:
    if m.isreg():
        return "file"
    if m.isdir():
        return "dir"
    if m.issym():
        return "symlink"
    if m.islnk():
        return "hardlink"
    return "other"


class _Prefixed:
    """A reader that returns `head` first, then the rest of `inner` (for sniffing magic)."""

    def __init__(self, head: bytes, inner: IO[bytes]) -> None:
        self.head, self.inner = head, inner

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n < 0:
                data, self.head = self.head + self.inner.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.inner.read(n)


def safe_extract(archive: Path | str | IO[bytes], dest: Path | str) -> list[str]:
    """Extract a tar or tar+zstd archive into `dest`; return the extracted names."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = Path(os.path.realpath(dest))
    if isinstance(archive, str | Path):
        with open(archive, "rb") as f:
            return _extract(f, root, str(archive))
    return _extract(archive, root, getattr(archive, "name", "archive"))


def _extract(raw: IO[bytes], root: Path, label: str) -> list[str]:
    head = raw.read(4)
    stream: IO[bytes] = _Prefixed(head, raw)  # type: ignore[assignment]
    if head == ZSTD_MAGIC:
        dctx = zstandard.ZstdDecompressor()
        stream = dctx.stream_reader(stream, read_across_frames=True)  # type: ignore[assignment]
    created: list[Path] = []
    files: set[PurePosixPath] = set()
    names: list[str] = []
    try:
        tar = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]
        seen: set[PurePosixPath] = set()
        for m in tar:
            kind = _kind(m)
            rel = check_member(m.name, kind, m.linkname)
            if rel in seen and kind != "dir":
                raise UnsafeArchive(f"{m.name!r}: appears twice in the archive")
            seen.add(rel)
            target = root / rel
            _make_parents(root, rel, created)
            if kind == "dir":
                if target.is_symlink() or (target.exists() and not target.is_dir()):
                    raise UnsafeArchive(f"{m.name!r}: would replace a non-directory")
                if not target.exists():
                    target.mkdir(mode=0o755)
                    created.append(target)
            elif kind == "file":
                reader = tar.extractfile(m)
                assert reader is not None
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                try:
                    fd = os.open(target, flags, m.mode & 0o777)
                except FileExistsError:
                    raise UnsafeArchive(f"{m.name!r}: would overwrite an existing file") from None
                created.append(target)
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(reader, out, 1 << 20)
                os.chmod(target, m.mode & 0o777)
                files.add(rel)
            elif kind == "symlink":
                os.symlink(m.linkname, target)
                created.append(target)
            else:
                src = check_member(m.linkname, "file")
                if src not in files:
                    raise UnsafeArchive(
                        f"{m.name!r}: hardlink to {m.linkname!r}, which is "
                        "not a regular file extracted before it"
                    )
                os.link(root / src, target, follow_symlinks=False)
                created.append(target)
            names.append(str(rel))
        _check_links_resolve_inside(root, created)
    except (tarfile.TarError, zstandard.ZstdError, EOFError) as exc:
        _remove(created)
        raise UnsafeArchive(f"{label}: not a readable archive: {exc}") from None
    except BaseException:
        _remove(created)
        raise
    return names


def _check_links_resolve_inside(root: Path, created: list[Path]) -> None:
    """Symlinks chained through other symlinks can leave even when each looks inside."""
    for p in created:
        if p.is_symlink():
            real = Path(os.path.realpath(p))
            if real != root and root not in real.parents:
                rel = p.relative_to(root)
                raise UnsafeArchive(f"{str(rel)!r}: symlink resolves outside the target")


def _make_parents(root: Path, rel: PurePosixPath, created: list[Path]) -> None:
    """Create the entry's parent directories, refusing to pass through any symlink."""
    here = root
    for part in rel.parts[:-1]:
        here = here / part
        if here.is_symlink():
            raise UnsafeArchive(f"{str(rel)!r}: would be written through symlink {part!r}")
        if not here.exists():
            here.mkdir(mode=0o755)
            created.append(here)
        elif not here.is_dir():
            raise UnsafeArchive(f"{str(rel)!r}: {part!r} is not a directory")
    if (root / rel).is_symlink():
        raise UnsafeArchive(f"{str(rel)!r}: would replace a symlink")


def _remove(created: list[Path]) -> None:
    for p in reversed(created):
        try:
            if p.is_dir() and not p.is_symlink():
                p.rmdir()
            else:
                p.unlink()
        except OSError:
            pass
