"""Building a release package: one deterministic tar+zstd archive and its content record.

Each file is read once, in 1 MiB chunks; every chunk is hashed (the file's sha256) and fed
to the compressor, whose output is hashed too (the archive's sha256) on its way to disk.

Determinism: entries sorted by path, regular files only, mtime 0, uid/gid 0, empty
owner names, mode 0644 or 0755, PAX format, UTF-8 names; zstd level 3 with a fixed
number of worker threads (zstd's multithreaded output does not depend on the thread
count, but we fix it anyway) and a checksum per frame. The package digest hashes the
content record only, so it does not even depend on the compressor.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from dml.digest import CHUNK, HashingWriter, content_digest
from dml.sources import SourceFile
from orchestrator.errors import BadInput

FORMAT = "ferry-package/1"
ARCHIVE_FORMAT = "tar+zstd"
ZSTD_LEVEL = 3
ZSTD_THREADS = 4
BLOCK = 512
RECORD = 20 * BLOCK  # what tar readers expect the archive to be padded to

Progress = Callable[[int, int], None]  # (bytes done, bytes total)


@dataclass(frozen=True)
class BuiltArchive:
    content: dict[str, Any]
    digest: str
    archive_path: Path  # a temp file; the store moves it into place
    archive_sha256: str
    archive_size: int
    total_size: int


def tar_header(path: str, size: int, mode: int) -> bytes:
    """The entry's header: ustar for short ASCII names (fast path), else tarfile's PAX."""
    name = path.encode("utf-8")
    if len(name) <= 100 and name.isascii() and size < 8**11:
        return _ustar(name, size, mode)
    return pax_header(path, size, mode)


def pax_header(path: str, size: int, mode: int) -> bytes:
    info = tarfile.TarInfo(path)
    info.size, info.mode, info.mtime = size, mode, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "strict")


def _ustar(name: bytes, size: int, mode: int) -> bytes:
    """Byte for byte what tarfile writes for such an entry (a test holds it to that)."""
    head = (
        name.ljust(100, b"\0")
        + b"%07o\0" % mode
        + b"0000000\0" * 2  # uid, gid
        + b"%011o\0" % size
        + b"00000000000\0"  # mtime
    )
    tail = (
        tarfile.REGTYPE
        + bytes(100)  # linkname
        + b"ustar\x0000"
        + bytes(64 + 16)  # uname, gname, devmajor, devminor (empty, as tarfile writes)
        + bytes(167)  # prefix and padding
    )
    chksum = sum(head) + sum(tail) + 8 * 0x20
    return head + b"%06o\0 " % chksum + tail


def compressor() -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS, write_checksum=True)


def make_content(name: str, version: str, units: list[str], files: list[dict[str, Any]]) -> dict:
    return {
        "format": FORMAT,
        "name": name,
        "version": version,
        "release": f"{name}@{version}",
        "units": sorted(units),
        "files": sorted(files, key=lambda f: f["path"]),
    }


def build_archive(
    name: str,
    version: str,
    units: list[str],
    files: list[SourceFile],
    tmp_dir: Path,
    progress: Progress | None = None,
) -> BuiltArchive:
    """Write the archive to a temp file in `tmp_dir`; the caller stores or removes it."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(files, key=lambda f: f.path)
    total = sum(f.size for f in files)
    handle, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix=".build-", suffix=".tar.zst")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(handle, "wb") as raw:
            out = HashingWriter(raw)  # type: ignore[arg-type]
            records = _write_tar(files, out, total, progress)
            raw.flush()
            os.fsync(raw.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    content = make_content(name, version, units, records)
    return BuiltArchive(
        content=content,
        digest=content_digest(content),
        archive_path=tmp,
        archive_sha256=out.sha.hexdigest(),
        archive_size=out.size,
        total_size=total,
    )


def _write_tar(
    files: list[SourceFile], out: HashingWriter, total: int, progress: Progress | None
) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    next_report = 64 << 20
    zw = compressor().stream_writer(out, closefd=False, write_return_read=True)  # type: ignore[arg-type]
    written = 0
    for f in files:
        header = tar_header(f.path, f.size, f.mode)
        zw.write(header)
        sha = hashlib.sha256()
        got = 0
        with f.open() as fh:
            while n := fh.readinto(buf):  # type: ignore[attr-defined]
                if got + n > f.size:
                    break
                chunk = view[:n]
                sha.update(chunk)
                zw.write(chunk)
                got += n
                done += n
                if progress and done >= next_report:
                    progress(done, total)
                    next_report = done + (64 << 20)
        if got != f.size:
            raise BadInput(f"{f.path} changed while it was being packaged; build again")
        pad = -f.size % BLOCK
        if pad:
            zw.write(bytes(pad))
        written += len(header) + f.size + pad
        records.append({"path": f.path, "size": f.size, "mode": f.mode, "sha256": sha.hexdigest()})
    end = 2 * BLOCK
    end += -(written + end) % RECORD
    zw.write(bytes(end))
    zw.flush(zstandard.FLUSH_FRAME)
    zw.close()
    if progress:
        progress(done, total)
    return records
