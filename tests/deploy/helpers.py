"""Helpers for deployment tests: releases, RFCs and plans against the real fleet."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml

from dml.store import DML
from orchestrator import catalog
from orchestrator.cms.db import session_scope
from orchestrator.lab.fleet import Fleet
from orchestrator.planner import release_id

HOOKS = {
    # data that survives releases: each release's install writes its version into it
    "snapshot": "mkdir -p {{ shared }}/data && cp -a {{ shared }}/data/. {{ snapshot_dir }}/",
    "install": "mkdir -p {{ shared }}/data && cp {{ release_path }}/app/VERSION "
    "{{ shared }}/data/schema",
    "activate": "true",
    "check": "test -f {{ release_path }}/app/health.ok",
    "restore": "rm -rf {{ shared }}/data && mkdir -p {{ shared }}/data && "
    "cp -a {{ snapshot_dir }}/. {{ shared }}/data/",
}
# a release-specific marker lets a test break exactly one host for exactly one version
BROKEN_CHECK = {"command": "test ! -e {{ shared }}/broken-{{ version }}"}


def build(work: Path, version: str, extra: dict[str, bytes] | None = None) -> dict[str, Any]:
    """Build shop@version into the DML (registered); returns the build result."""
    src = work / f"src-{version}"
    (src / "app").mkdir(parents=True, exist_ok=True)
    (src / "app" / "VERSION").write_text(version + "\n")
    (src / "app" / "health.ok").write_text("ok\n")
    run = src / "app" / "run"
    run.write_text("#!/bin/sh\necho shop " + version + "\n")
    run.chmod(0o755)
    for rel, data in (extra or {}).items():
        (src / "app" / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / "app" / rel).write_bytes(data)
    spec = src / "release.yaml"
    spec.write_text(
        yaml.safe_dump({"name": "shop", "version": version, "units": {"app": {"source": "app"}}})
    )
    return catalog.build_release(spec)


def rfc(run_ferry: Any, release: str, env: str = "dev", *extra: str) -> str:
    """A standard change (pre-authorized template) for `release` to `env`."""
    res = run_ferry(
        "rfc", "new", "--release", release, "--env", env, "--model", "standard",
        "--template", "any-to-staging", *extra, "-o", "json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    data = res.json()
    assert data["status"] in ("authorized", "scheduled"), data
    return str(data["id"])


def plan(work: Path, fleet: Fleet, name: str = "plan.yaml", **fields: Any) -> Path:
    doc: dict[str, Any] = {
        "environment": "dev",
        "inventory": str(fleet.inventory_path),
        "targets": "all",
        "strategy": "phased",
        "waves": [1, 3, "100%"],
        "method": "push",
        "hooks": dict(HOOKS),
        "milestone": {"max_failed": 0, "deadline": "120s", "soak": "0s", "checks": [BROKEN_CHECK]},
        "timeouts": {"step": "30s", "connect": "3s"},
    }
    doc.update(fields)
    path = work / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def deploy(run_ferry: Any, plan_path: Path, release: str, rfc_id: str | None, *extra: str):
    args = ["deploy", str(plan_path), "--release", release, "-o", "json", *extra]
    if rfc_id is not None:
        args += ["--rfc", rfc_id]
    return run_ferry(*args)


def host_release(fleet: Fleet, host: str) -> str | None:
    """What `current` points at on the host, read from its own filesystem view."""
    link = fleet.root_dir(host) / "current"
    return os.path.basename(os.readlink(link)) if link.is_symlink() else None


def files_match(fleet: Fleet, host: str, release: str) -> bool:
    """Every file of the release on the host matches the DML manifest's sha256."""
    pkg = DML.from_settings().open(release)
    base = fleet.root_dir(host) / "releases" / release_id(release, pkg.digest)
    for f in pkg.files:
        path = base / f.path
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != f.sha256:
            return False
    return True


def rid(release: str) -> str:
    return release_id(release, DML.from_settings().open(release).digest)


def shared_file(fleet: Fleet, host: str, rel: str) -> str | None:
    path = fleet.root_dir(host) / "shared" / rel
    return path.read_text().strip() if path.exists() else None


def cms(query: Any) -> Any:
    with session_scope() as s:
        return query(s)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)


def inventory_variant(fleet: Fleet, work: Path, name: str, **ssh: Any) -> Path:
    """A copy of the fleet's inventory with other ssh settings (paths made absolute)."""
    doc = yaml.safe_load(fleet.inventory_path.read_text())
    base = fleet.inventory_path.parent
    for key in ("identity_file", "known_hosts"):
        doc["ssh"][key] = str((base / doc["ssh"][key]).resolve())
    doc["ssh"].update(ssh)
    path = work / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
