"""Digests: the canonical JSON every digest and signature covers, and hashing streams.

`canonical(obj)` is the one serialisation of a JSON value Ferry hashes: sorted keys, no
whitespace, UTF-8. A package digest is `"sha256:" + sha256(canonical(content))`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, BinaryIO

CHUNK = 1 << 20  # 1 MiB reads: large enough that hashing runs at full speed
PREFIX = "sha256:"


def canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def content_digest(content: dict[str, Any]) -> str:
    return PREFIX + hashlib.sha256(canonical(content)).hexdigest()


def bytes_digest(data: bytes) -> str:
    return PREFIX + hashlib.sha256(data).hexdigest()


def hex_of(digest: str) -> str:
    """'sha256:ab…' → 'ab…'; refuses anything that is not a sha256 digest."""
    if not digest.startswith(PREFIX):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    hexpart = digest[len(PREFIX) :]
    if len(hexpart) != 64 or any(c not in "0123456789abcdef" for c in hexpart):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hexpart


def hash_file(path: Any) -> tuple[str, int]:
    """(sha256 hex, size) of a file, read once in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return h.hexdigest(), size


class HashingWriter:
    """A write-only file object that hashes and counts what passes through to `inner`."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.inner.write(data)

    def flush(self) -> None:
        self.inner.flush()


class HashingReader:
    """A read-only file object that hashes and counts what is read from `inner`."""

    def __init__(self, inner: BinaryIO) -> None:
        self.inner = inner
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK):
            pass
