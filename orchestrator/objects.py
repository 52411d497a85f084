"""The package's objects on the orchestrator: extracted once per deployment, framed for hosts.

Only what one run made is removed at its end (`close`); the DML is never touched.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path
from typing import Any


class ObjectCache:
    """The package's files by sha256, extracted once from the verified DML archive."""

    def __init__(self, package: Any, cache_root: Path) -> None:
        self.package = package
        self.root = cache_root
        self.dir = cache_root / "objects"
        self.sizes = {f.sha256: f.size for f in package.files}
        self._lock = threading.Lock()
        self._frame_locks: dict[str, threading.Lock] = {}
        self._ready = False

    def ensure(self) -> None:
        with self._lock:
            if self._ready:
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            missing = {s for s in self.sizes if not (self.dir / s).is_file()}
            if missing:
                for entry, stream in self.package.iter_files(missing):
                    if (self.dir / entry.sha256).is_file():
                        continue
                    tmp = self.dir / f"{entry.sha256}.tmp"
                    with open(tmp, "wb") as out:
                        while chunk := stream.read(1 << 20):
                            out.write(chunk)
                    tmp.replace(self.dir / entry.sha256)
            self._ready = True

    def frames(self, need: list[str]) -> Path:
        """One file of `<sha256> <size>\\n<bytes>` frames and `END`, per distinct need.

        Hosts that need the same objects (every host of a cold push) share one file, which
        the transport hands to the kernel (sendfile): no Python loop per byte or per host.
        """
        self.ensure()
        wanted = sorted(need)
        key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:24]
        path = self.dir.parent / "frames" / key
        with self._lock:
            lock = self._frame_locks.setdefault(key, threading.Lock())
        with lock:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as out:
                    for sha in wanted:
                        out.write(f"{sha} {self.sizes[sha]}\n".encode())
                        with open(self.dir / sha, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 20)
                    out.write(b"END\n")
                tmp.replace(path)
        return path

    def close(self) -> None:
        for sub in ("objects", "frames"):  # only what this run made
            shutil.rmtree(self.root / sub, ignore_errors=True)
