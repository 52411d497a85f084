"""Where a release unit's files come from: a directory, or a subdirectory of a git ref.

`collect(spec_path, units)` lists every file (unit-prefixed POSIX path, size, normalised
mode) without reading contents, so every spec problem is found before anything is built.
Symlinks and special files inside a source are refused (packages hold regular files
only; see docs/dml.md). Git units read blobs straight from the object store through one
`git cat-file --batch` process per repository, in order, each blob read once.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from dml.globs import selected
from dml.spec import Unit
from orchestrator.errors import SpecError


def normal_mode(mode: int) -> int:
    """0o755 when any execute bit is set, else 0o644: the only two modes a package holds."""
    return 0o755 if mode & 0o111 else 0o644


@dataclass(frozen=True)
class SourceFile:
    path: str  # "<unit>/<relative posix path>"
    size: int
    mode: int
    open: Callable[[], AbstractContextManager[IO[bytes]]] = field(compare=False, repr=False)


@dataclass
class Sources:
    files: list[SourceFile]
    provenance: dict[str, Any]
    _stack: ExitStack

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Sources:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect(spec_path: Path, units: dict[str, Unit], skip: list[Path] | None = None) -> Sources:
    """Every file of every unit, sorted by path; raises SpecError naming the unit's field."""
    stack = ExitStack()
    files: list[SourceFile] = []
    prov: dict[str, Any] = {}
    base = spec_path.parent
    try:
        for name in sorted(units):
            unit = units[name]
            if unit.image is not None:
                continue  # an image's blobs are not files (dml/image.py)
            if unit.source is not None:
                root = (base / unit.source).resolve()
                files += _walk_dir(spec_path, name, unit, root, [p.resolve() for p in skip or []])
                prov[name] = {"source": str(root), **git_state(root)}
            else:
                got, info = _git_unit(spec_path, name, unit, stack)
                files += got
                prov[name] = info
    except BaseException:
        stack.close()
        raise
    files.sort(key=lambda f: f.path)
    return Sources(files, prov, stack)


def _refuse(spec: Path, unit: str, fld: str, problem: str, fix: str) -> SpecError:
    return SpecError(str(spec), f"units.{unit}.{fld}", problem, fix)


def _walk_dir(spec: Path, unit: str, u: Unit, root: Path, skip: list[Path]) -> list[SourceFile]:
    include, exclude = u.globs()
    out: list[SourceFile] = []

    def visit(d: Path, rel: str) -> None:
        with os.scandir(d) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            relpath = f"{rel}{e.name}"
            try:
                relpath.encode("utf-8")
            except UnicodeEncodeError:
                raise _refuse(
                    spec,
                    unit,
                    "source",
                    f"{e.path!r}: file name is not UTF-8",
                    "rename it, or exclude it",
                ) from None
            st = e.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                if any(g.matches(relpath) for g in exclude) or Path(e.path).resolve() in skip:
                    continue
                visit(Path(e.path), relpath + "/")
                continue
            if not selected(relpath, include, exclude):
                continue
            if stat.S_ISLNK(st.st_mode):
                raise _refuse(
                    spec,
                    unit,
                    "source",
                    f"{relpath} is a symlink; packages hold regular files only",
                    "replace it by its target, or exclude it",
                )
            if not stat.S_ISREG(st.st_mode):
                raise _refuse(
                    spec, unit, "source", f"{relpath} is not a regular file", "exclude it"
                )
            out.append(
                SourceFile(
                    f"{unit}/{relpath}",
                    st.st_size,
                    normal_mode(st.st_mode),
                    _file_opener(Path(e.path)),
                )
            )

    try:
        visit(root, "")
    except PermissionError as exc:
        raise _refuse(
            spec,
            unit,
            "source",
            f"cannot read {exc.filename}",
            "fix its permissions, or exclude it",
        ) from None
    return out


def _file_opener(path: Path) -> Callable[[], AbstractContextManager[IO[bytes]]]:
    return lambda: open(path, "rb", buffering=0)


# --- git ---------------------------------------------------------------------------------

_URL = re.compile(r"^([a-z][a-z0-9+.-]*://|[^/@:]+@[^/:]+:)", re.I)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, check=False)


def git_state(path: Path) -> dict[str, Any]:
    """{"git": {"commit", "committed_at", "dirty"}} when `path` is inside a git work tree,
    else {}. `committed_at` (committer time) is where DORA's lead time for changes starts."""
    head = _git(path, "rev-parse", "HEAD")
    if head.returncode != 0:
        return {}
    dirty = _git(path, "status", "--porcelain", "--", ".")
    when = _git(path, "log", "-1", "--format=%cI", "HEAD")
    return {
        "git": {
            "commit": head.stdout.decode().strip(),
            "committed_at": when.stdout.decode().strip() or None if when.returncode == 0 else None,
            "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
        }
    }


def _git_unit(spec: Path, unit: str, u: Unit, stack: ExitStack) -> tuple[list[SourceFile], dict]:
    assert u.git is not None
    ref = u.ref or "HEAD"
    if _URL.match(u.git):
        tmp = Path(tempfile.mkdtemp(prefix="ferry-git-"))
        stack.callback(shutil.rmtree, tmp, True)
        repo = tmp / "repo.git"
        clone = subprocess.run(
            ["git", "clone", "--bare", "--quiet", u.git, str(repo)],
            capture_output=True,
            check=False,
        )
        if clone.returncode != 0:
            raise _refuse(
                spec,
                unit,
                "git",
                f"cannot clone {u.git}: {clone.stderr.decode(errors='replace').strip()}",
                "check the URL",
            )
    else:
        repo = (spec.parent / u.git).resolve()
        if not repo.exists() or _git(repo, "rev-parse", "--git-dir").returncode != 0:
            raise _refuse(
                spec,
                unit,
                "git",
                f"{repo} is not a git repository",
                "give a repository path relative to the spec file, or a URL",
            )
    rev = _git(repo, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if rev.returncode != 0:
        raise _refuse(
            spec,
            unit,
            "ref",
            f"{ref!r} is not a commit, branch or tag in {u.git}",
            "check the ref (git tag / git branch -a)",
        )
    commit = rev.stdout.decode().strip()
    sub = (u.path or "").strip("/")
    treeish = f"{commit}:{sub}" if sub else f"{commit}^{{tree}}"  # no path: the whole tree
    if _git(repo, "cat-file", "-t", treeish).stdout.strip() != b"tree":
        raise _refuse(
            spec,
            unit,
            "path",
            f"{sub!r} is not a directory at {ref}",
            "give a directory that exists in that commit",
        )
    listing = _git(repo, "ls-tree", "-r", "-z", "--long", treeish)
    if listing.returncode != 0:
        raise _refuse(
            spec,
            unit,
            "git",
            listing.stderr.decode(errors="replace").strip(),
            "check the repository",
        )
    include, exclude = u.globs()
    reader = _BlobReader(repo, stack)
    out: list[SourceFile] = []
    for rec in listing.stdout.split(b"\0"):
        if not rec:
            continue
        meta, _, raw_path = rec.partition(b"\t")
        mode, kind, obj, size = meta.split()
        try:
            relpath = raw_path.decode("utf-8")
        except UnicodeDecodeError:
            raise _refuse(
                spec, unit, "git", f"{raw_path!r}: file name is not UTF-8", "exclude it"
            ) from None
        if not selected(relpath, include, exclude):
            continue
        if kind != b"blob" or mode == b"120000":
            what = "a submodule" if kind == b"commit" else "a symlink"
            raise _refuse(
                spec,
                unit,
                "git",
                f"{relpath} is {what}; packages hold regular files only",
                "exclude it",
            )
        out.append(
            SourceFile(
                f"{unit}/{relpath}",
                int(size),
                normal_mode(int(mode, 8)),
                reader.opener(obj.decode(), int(size)),
            )
        )
    return out, {"git": {"repository": u.git, "ref": ref, "commit": commit, "path": sub}}


class _BlobReader:
    """One `git cat-file --batch` per repository; blobs are read in the order asked."""

    def __init__(self, repo: Path, stack: ExitStack) -> None:
        self.repo = repo
        self.proc: subprocess.Popen[bytes] | None = None
        stack.callback(self.close)

    def close(self) -> None:
        if self.proc is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def opener(self, obj: str, size: int) -> Callable[[], AbstractContextManager[IO[bytes]]]:
        return lambda: self._open(obj, size)

    @contextmanager
    def _open(self, obj: str, size: int) -> Iterator[IO[bytes]]:
        if self.proc is None:
            self.proc = subprocess.Popen(
                ["git", "-C", str(self.repo), "cat-file", "--batch"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(obj.encode() + b"\n")
        self.proc.stdin.flush()
        header = self.proc.stdout.readline().split()
        if len(header) != 3 or header[1] != b"blob" or int(header[2]) != size:
            raise OSError(f"git cat-file: unexpected answer for {obj}: {header!r}")
        limited = _Limited(self.proc.stdout, size)
        yield limited  # type: ignore[misc]
        limited.drain()
        self.proc.stdout.read(1)  # the newline after each object


class _Limited:
    def __init__(self, inner: IO[bytes], size: int) -> None:
        self.inner, self.left = inner, size

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = self.inner.read(n)
        self.left -= len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        while self.read(1 << 20):
            pass
