"""A CI job's side of Ferry: where it came from (provenance) and what it hands on.

Provenance — the pipeline or run (id and URL), the job, the commit, the actor — is read
from the variables GitLab CI and GitHub Actions set, and recorded on every RFC and
deployment a job makes (`ferry status --deployment ID` shows it), so an auditor can go from
a change record to the pipeline that made it.

What a job hands on, after a command:

- GitHub Actions (`GITHUB_ACTIONS=true`): `name=value` lines appended to `$GITHUB_OUTPUT`
  (e.g. `deployment_id`, `status`, `digest`), a Markdown section appended to
  `$GITHUB_STEP_SUMMARY`, and an `::error title=…::message` workflow command on stderr per
  failure (the runner reads workflow commands on both streams; stdout stays the one JSON
  object of `-o json`).
- GitLab CI (`GITLAB_CI=true`): `FERRY_*=value` lines in a dotenv file, `ferry.env` in the
  working directory or `$FERRY_DOTENV`, for `artifacts: reports: dotenv:` to pass the
  release, the RFC and the deployment to later jobs.

Outside CI nothing is written. Values are single-line (a newline in one could forge
another output), and nothing secret is among them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def provenance(env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """The CI job running this command, or None outside CI."""
    env = os.environ if env is None else env
    if env.get("GITLAB_CI"):
        fields = {
            "system": "gitlab",
            "pipeline_id": env.get("CI_PIPELINE_ID"),
            "pipeline_url": env.get("CI_PIPELINE_URL"),
            "job": env.get("CI_JOB_NAME"),
            "job_id": env.get("CI_JOB_ID"),
            "job_url": env.get("CI_JOB_URL"),
            "commit": env.get("CI_COMMIT_SHA"),
            "ref": env.get("CI_COMMIT_REF_NAME"),
            "project": env.get("CI_PROJECT_PATH"),
            "actor": env.get("GITLAB_USER_LOGIN"),
        }
    elif env.get("GITHUB_ACTIONS"):
        server, repo, run = (
            env.get("GITHUB_SERVER_URL", "https://github.com"),
            env.get("GITHUB_REPOSITORY"),
            env.get("GITHUB_RUN_ID"),
        )
        fields = {
            "system": "github",
            "pipeline_id": run,
            "pipeline_url": f"{server}/{repo}/actions/runs/{run}" if repo and run else None,
            "attempt": env.get("GITHUB_RUN_ATTEMPT"),
            "workflow": env.get("GITHUB_WORKFLOW"),
            "job": env.get("GITHUB_JOB"),
            "commit": env.get("GITHUB_SHA"),
            "ref": env.get("GITHUB_REF_NAME"),
            "project": repo,
            "actor": env.get("GITHUB_ACTOR"),
        }
    else:
        return None
    return {k: _line(v) for k, v in fields.items() if v}


def _line(value: object) -> str:
    return " ".join(str(value).split())


def _gh(env: Mapping[str, str]) -> bool:
    return bool(env.get("GITHUB_ACTIONS"))


def publish(
    outputs: Mapping[str, Any],
    *,
    summary: str | None = None,
    errors: list[tuple[str, str]] | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Hand a command's result to the CI system running it (nothing outside CI).

    `outputs`: name → value (GitHub step outputs; GitLab `FERRY_<NAME>` dotenv lines).
    `summary`: Markdown for the GitHub step summary. `errors`: (title, message) pairs.
    Writing them never fails the command: a CI file that cannot be written is a warning."""
    env = os.environ if env is None else env
    try:
        if _gh(env):
            _github(outputs, summary, errors or [], env)
        elif env.get("GITLAB_CI"):
            _gitlab(outputs, env)
    except OSError as exc:
        print(f"warning: could not write the CI outputs: {exc}", file=sys.stderr)


def _github(
    outputs: Mapping[str, Any], summary: str | None, errors: list[tuple[str, str]], env: Any
) -> None:
    out_file = env.get("GITHUB_OUTPUT")
    if out_file:
        with open(out_file, "a", encoding="utf-8") as f:
            for name, value in outputs.items():
                if value is not None:
                    f.write(f"{name}={_line(value)}\n")
    summary_file = env.get("GITHUB_STEP_SUMMARY")
    if summary and summary_file:
        with open(summary_file, "a", encoding="utf-8") as f:
            f.write(summary.rstrip("\n") + "\n\n")
    for title, message in errors:
        print(f"::error title={_escape(title, prop=True)}::{_escape(message)}", file=sys.stderr)
    sys.stderr.flush()


def _escape(text: str, prop: bool = False) -> str:
    """GitHub's workflow-command escaping (a newline would end the command)."""
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    if prop:
        text = text.replace(":", "%3A").replace(",", "%2C")
    return text


def dotenv_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("FERRY_DOTENV") or "ferry.env")


def _gitlab(outputs: Mapping[str, Any], env: Mapping[str, str]) -> None:
    """Merge into the dotenv file: a later command of the same job updates its keys."""
    path = dotenv_path(env)
    lines: dict[str, str] = {}
    if path.exists():
        for raw in path.read_text().splitlines():
            key, sep, value = raw.partition("=")
            if sep:
                lines[key] = value
    for name, value in outputs.items():
        if value is not None:
            lines["FERRY_" + name.upper()] = _line(value)
    path.write_text("".join(f"{k}={v}\n" for k, v in lines.items()))
