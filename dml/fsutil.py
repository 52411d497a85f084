"""Durable, atomic file writes and per-name locks for the DML store.

A file appears under its final name complete or not at all: written to a temp file in
the target's filesystem, fsynced, renamed, and the directory fsynced. Locks are fcntl
locks on small files, so concurrent writers in other processes queue.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically and durably (temp file in the same directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(Path(tmp))
        raise
    fsync_dir(path.parent)


def move_into_place(tmp: Path, path: Path) -> bool:
    """Rename a finished, fsynced temp file to `path` unless `path` already exists.

    Returns True when `tmp` became `path`; False when `path` was there already (content-
    addressed, so it holds the same bytes) and `tmp` was removed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(tmp, path)  # fails if path exists: never replaces a stored blob
    except FileExistsError:
        _unlink_quietly(tmp)
        return False
    _unlink_quietly(tmp)
    fsync_dir(path.parent)
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


@contextmanager
def locked(lock_path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an fcntl lock on `lock_path` (created if missing) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
