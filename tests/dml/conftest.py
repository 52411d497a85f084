"""DML test helpers: a small release tree on disk, and RFC rows made directly in the CMS."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dml.store import DML
from orchestrator.cms import audit, db
from orchestrator.cms.models import RFC

SPEC = """\
name: shop
version: 1.4.0
units:
  app:    {source: app, exclude: ["*.pyc"]}
  config: {source: config, include: ["*.j2", "*.toml"]}
"""


def write(path: Path, text: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    os.chmod(path, mode)
    return path


def make_tree(root: Path, spec: str = SPEC) -> Path:
    """A release spec with two units; returns the spec's path."""
    write(root / "app" / "bin" / "serve", "#!/bin/sh\necho serving\n", 0o755)
    write(root / "app" / "shop" / "__init__.py", "VERSION = '1.4.0'\n")
    write(root / "app" / "shop" / "cache.pyc", b"\x00compiled")
    write(root / "app" / "static" / "logo.bin", bytes(range(256)) * 40)
    write(root / "config" / "shop.toml.j2", "port = {{ port }}\n")
    write(root / "config" / "notes.txt", "not packaged\n")
    return write(root / "release.yaml", spec)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "src")


@pytest.fixture
def store(ferry_home: Path) -> DML:
    return DML.from_settings()


def dml_files(root: Path) -> list[str]:
    """Every file under the DML (empty when nothing was stored)."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def add_rfc(release: str, status: str = "authorized", stages: list[str] | None = None) -> int:
    """An RFC pre-authorized by the shipped standard template (no approvals needed)."""
    with db.session_scope() as session:
        rfc = RFC(
            title=f"release {release}",
            release=release,
            environment="staging",
            model="standard",
            template="any-to-staging",
            status=status,
            stages=stages if stages is not None else ["checkin", "deploy"],
            risk="low",
            requester="alice",
            backout_plan="point current back at the previous release",
        )
        session.add(rfc)
        session.flush()
        # the events Ferry records with them: the gate believes a status only with its event
        audit.append(
            session, actor="alice", action="rfc.created", subject_type="rfc", subject_id=rfc.id
        )
        if status != "draft":
            audit.append(
                session,
                actor="alice",
                action=f"rfc.{status}",
                subject_type="rfc",
                subject_id=rfc.id,
                data={"from": "draft", "to": status},
            )
        return rfc.id
