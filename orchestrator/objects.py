"""The package's objects on the orchestrator, framed for hosts.

A push frames what hosts need from the DML's unpacked objects (each hashed as it is read),
or, where the DML lacks one, straight from the verified archive in one streaming pass per
distinct need: a cold push (every host needs everything) and an incremental one (every host
needs the same few objects) each make one frames file, and no object is written to disk on
its own. Only when hosts need many different subsets (a fleet at mixed releases) are
the objects extracted once (`ensure`) and each frames file built from them; the DML server
extracts them to serve objects one by one.

Only what one run made is removed at its end (`close`); the DML is never touched.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

from dml.digest import CHUNK, HashingReader

# distinct needs framed straight from the archive before extracting the objects is cheaper
# (each pass decompresses and checks the whole archive; an extraction writes every object)
STREAMED_NEEDS = 2


def need_ahead(package: Iterable[str], priors: Mapping[frozenset[str] | None, int]) -> list[str]:
    """What most hosts of a wave will ask for, guessed from what the CMS says each runs: the
    package's objects its prior release lacks (all of them on a host with none). `priors`:
    each distinct prior's objects (None: no prior) → how many hosts run it; hosts already at
    the package are left out by the caller. [] when no host needs anything."""
    wanted = frozenset(package)
    guesses: Counter[frozenset[str]] = Counter()
    for prior, hosts in priors.items():  # one difference per distinct prior, not per host
        if need := wanted - (prior or frozenset()):
            guesses[need] += hosts
    return sorted(guesses.most_common(1)[0][0]) if guesses else []


class ObjectCache:
    """The package's files by sha256, from the verified DML archive."""

    def __init__(self, package: Any, cache_root: Path, store: Path | None = None) -> None:
        self.package = package
        self.root = cache_root
        self.store = store  # the DML's unpacked objects (dml.store), hashed at every read
        self.dir = cache_root / "objects"
        self.sizes = {f.sha256: f.size for f in package.files}
        self._lock = threading.Lock()
        self._frame_locks: dict[str, threading.Lock] = {}
        self._ready = False
        self._ahead: threading.Thread | None = None

    def ensure(self) -> None:
        """Extract every object into objects/<sha256> (once)."""
        with self._lock:
            if self._ready:
                return
            missing = {s for s in self.sizes if not (self.dir / s).is_file()}
            if missing:
                self.package.unpack(self.dir, missing)
            self._ready = True

    def frames(self, need: list[str]) -> Path:
        """One file of `<sha256> <size>\\n<bytes>` frames and `END`, per distinct need.

        Hosts that need the same objects (every host of a cold push) share one file, which
        the transport hands to the kernel (sendfile): no Python loop per byte or per host.
        The host takes the frames in any order and checks each against what it asked for.
        """
        wanted = sorted(set(need))
        unknown = [s for s in wanted if s not in self.sizes]
        if unknown:
            raise ValueError(f"object {unknown[0]} is not in {self.package.release}")
        key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:24]
        path = self.root / "frames" / key
        with self._lock:
            lock = self._frame_locks.setdefault(key, threading.Lock())
            # the distinct needs seen so far, this one included (a need asked again finds
            # its frames file made)
            stream = not self._ready and len(self._frame_locks) <= STREAMED_NEEDS
        with lock:
            if path.exists():
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            try:
                with open(tmp, "wb") as out:
                    if not self._frame_from_store(wanted, out):
                        out.seek(0)
                        out.truncate()
                        if stream:
                            self._frame_from_archive(set(wanted), out)
                        else:
                            self.ensure()
                            for sha in wanted:
                                out.write(f"{sha} {self.sizes[sha]}\n".encode())
                                with open(self.dir / sha, "rb") as f:
                                    shutil.copyfileobj(f, out, 1 << 20)
                    out.write(b"END\n")
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            tmp.replace(path)
        return path

    def _frame_from_store(self, wanted: list[str], out: IO[bytes]) -> bool:
        """Each object from the DML's unpacked copy, hashed as it is copied: an incremental
        release's few objects without a pass over the whole archive. False when one is
        missing or its bytes are not the ones the signed manifest names (the caller then
        frames from the archive, and nothing written here is kept)."""
        if self.store is None:
            return False
        for sha in wanted:
            try:
                f = open(self.store / sha, "rb")  # noqa: SIM115 - closed just below
            except OSError:
                return False
            with f:
                out.write(f"{sha} {self.sizes[sha]}\n".encode())
                read = HashingReader(f)
                shutil.copyfileobj(read, out, CHUNK)
            if read.size != self.sizes[sha] or read.sha.hexdigest() != sha:
                return False
        return True

    def _frame_from_archive(self, wanted: set[str], out: IO[bytes]) -> None:
        """One pass over the archive: each wanted object once (a file's bytes are checked
        against the manifest as they stream, the archive's own sha256 at its end)."""
        written: set[str] = set()
        for entry, stream in self.package.iter_files(wanted):
            if entry.sha256 in written:
                continue  # the same content at another path: the host needs it once
            out.write(f"{entry.sha256} {entry.size}\n".encode())
            shutil.copyfileobj(stream, out, 1 << 20)
            written.add(entry.sha256)

    @property
    def framing_ahead(self) -> bool:
        """Has a guess been framed ahead in this run (there is one per run)?"""
        return self._ahead is not None

    def frame_ahead(self, need: list[str]) -> None:
        """Start framing `need` now, in the background, while the hosts log in and inspect:
        a host that asks for it waits for this pass instead of starting its own. A guess
        that no host asks for costs one pass and one of the streamed needs."""
        if not need or self._ahead is not None:
            return

        def frame() -> None:
            try:
                self.frames(need)
            except Exception:  # noqa: BLE001 - a host asking for it frames it again and says why
                pass

        self._ahead = threading.Thread(target=frame, name="frame-ahead", daemon=True)
        self._ahead.start()

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.join()  # it writes under the directories removed next
        for sub in ("objects", "frames"):  # only what this run made
            shutil.rmtree(self.root / sub, ignore_errors=True)
