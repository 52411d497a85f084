"""Release source trees for the scenarios: random (incompressible) bytes, so every tool moves
the same number of bytes whether or not it compresses."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

NAME = "bench"


def make_tree(src: Path, version: str, total: int, files: int) -> Path:
    """src/app: `files` files of total/files random bytes plus app/VERSION; returns the spec."""
    shutil.rmtree(src, ignore_errors=True)
    app = src / "app"
    size = max(1, total // files)
    for i in range(files):
        d = app / f"d{i // 100:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i:04d}.bin").write_bytes(os.urandom(size))
    (app / "VERSION").write_text(version + "\n")
    return write_spec(src, version)


def next_version(base: Path, src: Path, version: str, fraction: float) -> tuple[Path, int]:
    """A copy of `base` with `fraction` of its files changed (VERSION counts as one).

    Returns (spec path, number of files changed)."""
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(base / "app", src / "app")
    data = sorted(p for p in (src / "app").rglob("*.bin"))
    n_changed = max(1, round((len(data) + 1) * fraction))
    step = max(1, len(data) // max(1, n_changed - 1))
    for p in data[::step][: n_changed - 1]:
        p.write_bytes(os.urandom(p.stat().st_size))
    (src / "app" / "VERSION").write_text(version + "\n")
    return write_spec(src, version), n_changed


def write_spec(src: Path, version: str) -> Path:
    spec = src / "release.yaml"
    spec.write_text(f'name: {NAME}\nversion: "{version}"\nunits:\n  app: {{source: app}}\n')
    return spec
