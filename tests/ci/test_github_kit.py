"""The shipped GitHub Actions workflow, its steps run as a runner runs them: each `run:`
in bash with GitHub's environment variables (GITHUB_ACTIONS, GITHUB_OUTPUT per step,
GITHUB_STEP_SUMMARY, the run's ids), `${{ }}` expressions resolved from earlier steps' and
jobs' outputs. `uses:` steps (checkout, upload-artifact) are GitHub's own and not run.
Checked: the outputs file, the step summary and the ::error:: annotations."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ci.kit import KITS, git_repo, project
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import host_release, rid

pytestmark = pytest.mark.fleet

EXPR = re.compile(r"\$\{\{\s*(.*?)\s*\}\}")


class Run:
    """One workflow run on a self-hosted runner, job by job."""

    def __init__(self, workflow: dict[str, Any], repo: Path, secrets: dict[str, str],
                 env: dict[str, str], run_id: str) -> None:  # fmt: skip
        self.wf, self.repo, self.secrets, self.run_id = workflow, repo, secrets, run_id
        self.env = {**workflow.get("env", {}), **env}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.summary = repo.parent / f"summary-{run_id}.md"
        self.annotations: list[str] = []

    def value(self, expr: str, steps: dict[str, dict[str, str]]) -> str:
        head, _, rest = expr.partition(".")
        if head == "secrets":
            return self.secrets.get(rest, "")
        if head == "github":
            return {"workspace": str(self.repo), "event_name": "push", "run_id": self.run_id}[rest]
        if head == "needs":
            job, _, out = rest.partition(".outputs.")
            return self.jobs[job]["outputs"].get(out, "")
        if head == "steps":
            step, _, out = rest.partition(".outputs.")
            return steps.get(step, {}).get(out, "")
        if head == "env":
            return str(self.env.get(rest, ""))
        raise AssertionError(f"expression not understood: {expr}")

    def sub(self, text: str, steps: dict[str, dict[str, str]]) -> str:
        return EXPR.sub(lambda m: self.value(m.group(1), steps), str(text))

    def condition(self, cond: str | None, steps: dict, failed: bool) -> bool:
        if cond is None:
            return not failed
        if cond == "always()":
            return True
        m = re.fullmatch(r"(\S+) (==|!=) '([^']*)'", cond.strip())
        assert m, f"condition not understood: {cond}"
        got = self.value(m.group(1), steps)
        return not failed and ((got == m.group(3)) == (m.group(2) == "=="))

    def job(self, name: str) -> dict[str, Any]:
        spec = self.wf["jobs"][name]
        assert "self-hosted" in spec["runs-on"]
        steps: dict[str, dict[str, str]] = {}
        env = {k: self.sub(v, steps) for k, v in self.env.items()}
        failed, codes = False, []
        for i, step in enumerate(spec["steps"]):
            if "uses" in step or not self.condition(step.get("if"), steps, failed):
                continue
            out = self.repo.parent / f"out-{self.run_id}-{name}-{i}"
            out.write_text("")
            step_env = {**env, **{k: self.sub(v, steps) for k, v in step.get("env", {}).items()}}
            proc = subprocess.run(
                ["bash", "-e", "-c", self.sub(step["run"], steps)],
                cwd=self.repo,
                env={**_base_env(), **step_env, **self.github(name, out)},
                capture_output=True,
                text=True,
                timeout=900,
            )
            self.annotations += [x for x in proc.stderr.splitlines() if x.startswith("::")]
            codes.append(proc.returncode)
            steps[step.get("id", f"step{i}")] = dict(
                line.split("=", 1) for line in out.read_text().splitlines() if "=" in line
            )
            if proc.returncode:
                failed = True
                print(proc.stdout[-3000:], proc.stderr[-3000:])
        outputs = {k: self.sub(v, steps) for k, v in spec.get("outputs", {}).items()}
        self.jobs[name] = {"outputs": outputs, "steps": steps, "failed": failed, "codes": codes}
        return self.jobs[name]

    def github(self, job: str, out: Path) -> dict[str, str]:
        return {
            "GITHUB_ACTIONS": "true", "CI": "true", "GITHUB_RUN_ID": self.run_id,
            "GITHUB_RUN_ATTEMPT": "1", "GITHUB_JOB": job, "GITHUB_WORKFLOW": self.wf["name"],
            "GITHUB_REPOSITORY": "ops/shop", "GITHUB_SERVER_URL": "https://github.com",
            "GITHUB_SHA": _head(self.repo), "GITHUB_REF_NAME": "main", "GITHUB_ACTOR": "rel",
            "GITHUB_WORKSPACE": str(self.repo), "GITHUB_EVENT_NAME": "push",
            "GITHUB_OUTPUT": str(out), "GITHUB_STEP_SUMMARY": str(self.summary),
        }  # fmt: skip


def _base_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "PREFECT_API_URL", "FERRY_HOME", "FERRY_PREFECT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env["PATH"] = f"{FERRY_BIN.parent}:{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()


def test_the_github_workflow_builds_raises_waits_deploys_and_reports_a_broken_release(
    clean_small, tmp_path, run_ferry
):
    fleet = clean_small
    repo = project(tmp_path / "shop", fleet)
    workflow = yaml.safe_load((KITS / "github" / "release.yml").read_text())
    shutil.copy(KITS / "github" / "release.yml", repo / "release.yml")
    git_repo(repo)
    # the team's key, as the secret FERRY_DML_KEY holds it
    assert run_ferry("dml", "keygen").returncode == 0
    assert run_ferry("dml", "key", "export", str(tmp_path / "team.key")).returncode == 0
    secrets = {"FERRY_DML_KEY": (tmp_path / "team.key").read_text(), "FERRY_DATABASE_URL": ""}
    env = {"TARGET_ENV": "dev", "CHANGE_MODEL": "standard", "CHANGE_TEMPLATE": "any-to-staging"}

    good = Run(workflow, repo, secrets, env, run_id="1001")
    build = good.job("build")
    assert not build["failed"] and build["outputs"]["release"] == "shop@1.0"
    assert build["outputs"]["digest"].startswith("sha256:")
    change = good.job("change")
    assert not change["failed"] and change["outputs"]["rfc"].isdigit()
    deploy = good.job("deploy")
    assert not deploy["failed"], deploy
    outputs = deploy["steps"]["deploy"]
    assert outputs["status"] == "succeeded" and outputs["exit_code"] == "0"
    assert outputs["digest"] == build["outputs"]["digest"] and outputs["deployment_id"].isdigit()
    assert [host_release(fleet, h) for h in ("h1", "h2")] == [rid("shop@1.0")] * 2
    summary = good.summary.read_text()
    assert f"### Ferry deployment {outputs['deployment_id']}: succeeded" in summary
    assert "| h1 | deployed | shop@1.0 |" in summary and good.annotations == []
    shown = run_ferry("status", "--deployment", outputs["deployment_id"], "-o", "json").json()
    ci = shown["deployment"]["ci"]
    assert ci["pipeline_url"] == "https://github.com/ops/shop/actions/runs/1001"
    assert (ci["job"], ci["actor"]) == ("deploy", "rel")

    # a broken release: the deploy step fails with exit 4; outputs, summary, annotations say why
    (fleet.root_dir("h1") / "shared" / "broken-2.0").write_text("")
    (repo / "release.yaml").write_text((repo / "release.yaml").read_text().replace("1.0", "2.0"))
    bad = Run(workflow, repo, secrets, env, run_id="1002")
    assert bad.job("build")["outputs"]["release"] == "shop@2.0"
    bad.job("change")
    deploy = bad.job("deploy")
    assert deploy["failed"] and deploy["codes"][-1] == 4
    outputs = deploy["steps"]["deploy"]
    assert (outputs["status"], outputs["exit_code"]) == ("backed-out", "4")
    summary = bad.summary.read_text()
    assert f"### Ferry deployment {outputs['deployment_id']}: backed-out" in summary
    assert "| h1 | backed-out | shop@1.0 | milestone: command: test ! -e" in summary
    assert bad.annotations[0].startswith("::error title=ferry deploy%3A h1::milestone: command:")
    assert any(a.startswith("::error title=ferry deploy%3A milestone 1::") for a in bad.annotations)
    assert host_release(fleet, "h1") == rid("shop@1.0")
    assert (repo / "junit-deploy.xml").is_file()
