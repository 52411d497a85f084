"""After every tool's run: read each host's files from the root namespace and compare them
with the package's manifest, so no tool wins by doing less."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from orchestrator.lab.fleet import Fleet


class VerifyFailed(Exception):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_host(
    fleet: Fleet, host: str, release_dir: str, manifest: dict[str, str], current: bool
) -> str | None:
    root = fleet.root_dir(host)
    base = root / "releases" / release_dir
    for rel, sha in manifest.items():
        path = base / rel
        if not path.is_file():
            return f"{host}: {rel} missing under releases/{release_dir}"
        if sha256_file(path) != sha:
            return f"{host}: {rel} differs"
    if current:
        link = root / "current"
        if not link.is_symlink():
            return f"{host}: current is not a symlink"
        if os.path.basename(os.readlink(link)) != release_dir:
            return f"{host}: current -> {os.readlink(link)}, expected releases/{release_dir}"
    return None


def release_on(
    fleet: Fleet,
    hosts: list[str],
    release_dir: str,
    manifest: dict[str, str],
    *,
    current: bool = True,
    files: bool = True,
) -> None:
    """Every host holds every file of the release (sha256) and `current` points at it.

    files=False checks only `current` (a backout: the files were checked when deployed)."""
    wanted = manifest if files else {}
    with ThreadPoolExecutor(4) as pool:
        errors = [
            e
            for e in pool.map(lambda h: _check_host(fleet, h, release_dir, wanted, current), hosts)
            if e
        ]
    if errors:
        raise VerifyFailed(f"{len(errors)} host(s) wrong: " + "; ".join(errors[:5]))


def file_on(fleet: Fleet, hosts: list[str], rel: str, sha: str) -> None:
    """The raw copy: the same bytes landed on every host."""

    def one(h: str) -> str | None:
        p = fleet.root_dir(h) / rel
        return None if p.is_file() and sha256_file(p) == sha else f"{h}: {rel} missing/differs"

    with ThreadPoolExecutor(4) as pool:
        errors = [e for e in pool.map(one, hosts) if e]
    if errors:
        raise VerifyFailed(f"{len(errors)} host(s) wrong: " + "; ".join(errors[:5]))
