"""Where a package came from: source commits, CI pipeline and job, builder, build time.

Provenance lives in the manifest beside the content, never inside it, so rebuilding the
same inputs gives the same package digest. CI variables are taken from an allow-list
(never tokens): GitLab `CI_*` and GitHub `GITHUB_*`.
"""

from __future__ import annotations

import os
import platform
import socket
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from dml.sources import git_state

GITLAB = (
    "CI_PIPELINE_ID",
    "CI_PIPELINE_URL",
    "CI_JOB_ID",
    "CI_JOB_URL",
    "CI_JOB_NAME",
    "CI_COMMIT_SHA",
    "CI_COMMIT_REF_NAME",
    "CI_COMMIT_TAG",
    "CI_PROJECT_PATH",
    "CI_PROJECT_URL",
    "CI_SERVER_URL",
    "CI_RUNNER_ID",
    "GITLAB_USER_LOGIN",
)
GITHUB = (
    "GITHUB_RUN_ID",
    "GITHUB_RUN_NUMBER",
    "GITHUB_RUN_ATTEMPT",
    "GITHUB_SHA",
    "GITHUB_REF",
    "GITHUB_REPOSITORY",
    "GITHUB_WORKFLOW",
    "GITHUB_JOB",
    "GITHUB_ACTOR",
    "GITHUB_SERVER_URL",
)


def ci_vars(env: dict[str, str] | None = None) -> dict[str, dict[str, str]]:
    env = dict(os.environ) if env is None else env
    found: dict[str, dict[str, str]] = {}
    for system, names in (("gitlab", GITLAB), ("github", GITHUB)):
        values = {n: env[n] for n in names if env.get(n)}
        if values:
            found[system] = values
    return found


def _ferry_version() -> str:
    try:
        return metadata.version("ferry")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_provenance(spec_path: Path, units: dict[str, Any], actor: str) -> dict[str, Any]:
    spec_path = spec_path.resolve()
    return {
        "spec": str(spec_path),
        "source": git_state(spec_path.parent).get("git"),
        "units": units,
        "ci": ci_vars(),
        "builder": {
            "actor": actor,
            "host": socket.gethostname(),
            "ferry": _ferry_version(),
            "python": platform.python_version(),
        },
        "built_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
