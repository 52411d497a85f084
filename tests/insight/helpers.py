"""Insight test helpers: an organisation's change files, releases built from git commits of
known times, normal and emergency RFCs driven through the real CLI."""

from __future__ import annotations

import os
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator import catalog

MODELS = {
    "roles": {"bob": ["peer"], "carol": ["cab", "change-manager"], "erin": ["ecab"]},
    "models": {
        "standard": {
            "templates": [
                {
                    "name": "any-to-staging",
                    "release": "*",
                    "environments": ["staging"],
                    "max_risk": "high",
                }
            ]
        },  # fmt: skip
        "normal": {
            "approvals": {"low": {"count": 1}, "medium": {"count": 1}, "high": {"count": 1}},
            "lead_time_hours": {"low": 0, "medium": 0, "high": 0},
        },
        "emergency": {"approvals": {"count": 1, "roles": ["ecab"]}, "review_within_days": 5},
    },
}
CALENDAR = {
    "environments": {"staging": {"criticality": "low"}, "production": {"criticality": "low"}}
}


def change_files(work: Path, monkeypatch: pytest.MonkeyPatch, **normal: Any) -> tuple[Path, Path]:
    models = yaml.safe_load(yaml.safe_dump(MODELS))
    models["models"]["normal"].update(normal)
    m, c = work / "change_models.yaml", work / "calendar.yaml"
    m.write_text(yaml.safe_dump(models))
    c.write_text(yaml.safe_dump(CALENDAR))
    monkeypatch.setenv("FERRY_CHANGE_MODELS", str(m))
    monkeypatch.setenv("FERRY_CALENDAR", str(c))
    return m, c


def build_committed(work: Path, version: str, committed: datetime) -> dict[str, Any]:
    """shop@version built from a git work tree whose one commit has this committer time."""
    src = work / f"src-{version}"
    (src / "app").mkdir(parents=True)
    (src / "app" / "VERSION").write_text(version + "\n")
    (src / "app" / "health.ok").write_text("ok\n")
    (src / "release.yaml").write_text(
        yaml.safe_dump({"name": "shop", "version": version, "units": {"app": {"source": "app"}}})
    )
    stamp = committed.strftime("%Y-%m-%dT%H:%M:%S+00:00")
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_AUTHOR_DATE": stamp, "GIT_COMMITTER_DATE": stamp,
    }  # fmt: skip
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", f"shop {version}"]):
        subprocess.run(["git", "-C", str(src), *args], check=True, env=env, capture_output=True)
    return catalog.build_release(src / "release.yaml")


def ok(res: Any) -> Any:
    assert res.returncode == 0, res.stdout + res.stderr
    return res.json()


def standard_rfc(run_ferry: Any, release: str, env: str = "staging") -> str:
    data = ok(
        run_ferry("rfc", "new", "--release", release, "--env", env, "--model", "standard",
                  "--template", "any-to-staging", "-o", "json")
    )  # fmt: skip
    assert data["status"] == "authorized", data
    return str(data["id"])


def normal_rfc(run_ferry: Any, release: str, env: str = "production", **kw: Any) -> str:
    data = ok(
        run_ferry("rfc", "new", "--release", release, "--env", env, "--model", "normal",
                  "--risk", "low", "--reason", "lab test", "-o", "json")
    )  # fmt: skip
    rid = str(data["id"])
    ok(run_ferry("rfc", "submit", rid, "-o", "json"))
    if kw.get("approve", True):
        ok(run_ferry("rfc", "approve", rid, "-o", "json", env={"FERRY_USER": "carol"}))
    return rid


def emergency_rfc(run_ferry: Any, release: str, env: str = "production") -> str:
    data = ok(
        run_ferry("rfc", "new", "--release", release, "--env", env, "--model", "emergency",
                  "-o", "json")
    )  # fmt: skip
    rid = str(data["id"])
    ok(run_ferry("rfc", "submit", rid, "-o", "json"))
    data = ok(run_ferry("rfc", "approve", rid, "-o", "json", env={"FERRY_USER": "erin"}))
    assert data["status"] == "authorized", data
    return rid
