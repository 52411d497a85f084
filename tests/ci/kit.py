"""A project repository as a release engineer keeps it: a release spec, a deploy plan for
the lab fleet, and one of the shipped pipeline kits."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from orchestrator.lab.fleet import Fleet
from tests.deploy.helpers import BROKEN_CHECK, HOOKS

KITS = Path(__file__).resolve().parents[2] / "docs" / "pipelines"


def project(where: Path, fleet: Fleet, hosts: str = "h1,h2") -> Path:
    where.mkdir(parents=True)
    app = where / "app"
    app.mkdir()
    (app / "health.ok").write_text("ok\n")
    (app / "VERSION").write_text("see the release\n")
    (where / "release.yaml").write_text(
        yaml.safe_dump({"name": "shop", "version": "1.0", "units": {"app": {"source": "app"}}})
    )
    (where / "deploy_plans").mkdir()
    plan = {
        "environment": "dev",
        "inventory": str(fleet.inventory_path),
        "targets": hosts,
        "strategy": "phased",
        "waves": [1, "100%"],
        "hooks": {k: HOOKS[k] for k in ("activate", "check")},
        "milestone": {"max_failed": 0, "deadline": "120s", "checks": [BROKEN_CHECK]},
        "timeouts": {"step": "30s", "connect": "3s"},
    }
    (where / "deploy_plans" / "shop.yaml").write_text(yaml.safe_dump(plan, sort_keys=False))
    return where


def git_repo(where: Path) -> None:
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.name", "Rel Engineer"],
        ["config", "user.email", "rel@example.com"],
        ["remote", "add", "origin", "git@gitlab.example.com:ops/shop.git"],
        ["add", "-A"],
        ["commit", "-q", "-m", "shop"],
    ):
        subprocess.run(["git", *args], cwd=where, check=True, capture_output=True)
