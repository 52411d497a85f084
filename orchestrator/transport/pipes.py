"""The capacity of the pipe Ferry feeds each host's ssh client through (Act).

A bulk transfer writes the package's objects with sendfile(2) into the ssh client's stdin.
At Linux's default 64 KiB the pipe fills at once, so Ferry's writing thread wakes for
every few pages ssh reads, and ssh gets the bytes in small pieces and sends them to sshd
in small packets. Measured on the lab fleet (cold push of 100 MB to 20 hosts, 3 runs each,
alternated in one invocation): a 1 MiB pipe cut the ssh clients' CPU by 24%, sshd's by 39%
and the push's wall time by 17%; 256 KiB, 512 KiB and 4 MiB were all slower than 1 MiB.

The capacity is taken only for the transfer and given back after it. The kernel counts
pipe pages per user: past /proc/sys/fs/pipe-user-pages-soft (64 MiB by default) an
unprivileged user's new pipes get two pages, every ssh session's included, and growing one
fails. So a user other than root widens at most as many pipes at once as fit in half that
limit; the others keep the default, which is slower but the same stream.
"""

from __future__ import annotations

import os
import threading

F_SETPIPE_SZ = 1031  # Linux fcntl(2): set a pipe's capacity
F_GETPIPE_SZ = 1032  # Linux fcntl(2): read it
BULK = 1 << 20  # a bulk transfer's pipe: the limit an unprivileged user may ask for
PAGE = 4096


def _soft_limit_pages() -> int:
    """The kernel's soft limit on one user's pipe pages; 0: none."""
    try:
        with open("/proc/sys/fs/pipe-user-pages-soft") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def wide_pipes_allowed(euid: int, soft_pages: int) -> int | None:
    """How many pipes may be widened at once: None for root (no limit applies), or the
    number that fits in half the user's soft limit (the other half is every other pipe)."""
    if euid == 0 or soft_pages <= 0:
        return None
    return soft_pages // 2 // (BULK // PAGE)


class WidePipes:
    """The process's budget of widened pipes (shared by all its sessions)."""

    def __init__(self, allowed: int | None) -> None:
        self.allowed = allowed
        self.held = 0
        self._lock = threading.Lock()

    def widen(self, fd: int) -> int | None:
        """Give the pipe at `fd` the bulk capacity when the budget allows and it is smaller;
        the capacity it had before (to give back with narrow), or None if it was not
        widened."""
        with self._lock:
            if self.allowed is not None and self.held >= self.allowed:
                return None
            before = _size(fd)
            # a kernel with larger pages (64 KiB: 1 MiB by default) needs no widening
            if before is None or before >= BULK or not _set_size(fd, BULK):
                return None
            self.held += 1
            return before

    def narrow(self, fd: int, before: int) -> bool:
        """Back to the capacity the pipe had before widen (it must hold no more than
        that); True once its pages are given back."""
        if not _set_size(fd, before):
            return False
        with self._lock:
            self.held -= 1
        return True

    def forget(self) -> None:
        """A widened pipe was closed: the kernel took its pages back."""
        with self._lock:
            self.held -= 1


def _size(fd: int) -> int | None:
    try:
        import fcntl

        return fcntl.fcntl(fd, F_GETPIPE_SZ)
    except (ImportError, OSError, ValueError):
        return None  # not Linux, or not a pipe


def _set_size(fd: int, size: int) -> bool:
    try:
        import fcntl

        fcntl.fcntl(fd, F_SETPIPE_SZ, size)
        return True
    except (ImportError, OSError, ValueError):
        return False  # not Linux, not a pipe, over the user's limit, or still too full


BUDGET = WidePipes(wide_pipes_allowed(os.geteuid(), _soft_limit_pages()))
