"""The shipped .gitlab-ci.yml, run by a real GitLab CI runner (gitlab-ci-local, shell
executor) against the lab fleet: build → RFC → manual approval → deploy succeed; a broken
release's deploy job fails with exit 4 and its JUnit report names the failing check; the
scheduled drift audit passes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.ci.kit import KITS, git_repo, project
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import cms, host_release, rid

pytestmark = pytest.mark.fleet

VERSION = "4.60.0"  # runs on Debian's Node 20 (.ci/bootstrap installs it)
GCL = Path(
    os.environ.get("FERRY_GITLAB_CI_LOCAL_DIR", f"/var/cache/ferry/gitlab-ci-local-{VERSION}")
)


@pytest.fixture(scope="module")
def gitlab_ci_local() -> Path:
    """gitlab-ci-local, pinned, from the npm registry (once per machine: its native re2
    module compiles for minutes; .ci/bootstrap does the same)."""
    exe = GCL / "node_modules" / ".bin" / "gitlab-ci-local"
    if not exe.exists():
        subprocess.run(
            ["npm", "install", "--prefix", str(GCL), "--no-audit", "--no-fund",
             f"gitlab-ci-local@{VERSION}"],
            check=True, capture_output=True, timeout=3600,
        )  # fmt: skip
    got = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == VERSION
    return exe


def _pipeline(exe: Path, repo: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    variables = {
        "FERRY": str(FERRY_BIN),
        "FERRY_HOME": os.environ["FERRY_HOME"],
        "FERRY_PREFECT": os.environ["FERRY_PREFECT"],
        "PREFECT_API_URL": os.environ["PREFECT_API_URL"],
        "TARGET_ENV": "dev",
        "CHANGE_MODEL": "standard",
        "CHANGE_TEMPLATE": "any-to-staging",
        "APPROVAL_TIMEOUT": "30",
    }
    args = [str(exe), "--manual", "approve", "--no-color", "--max-job-name-padding", "0"]
    for k, v in variables.items():
        args += ["--variable", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("FERRY_")}
    return subprocess.run(
        [*args, *extra], cwd=repo, env=env, capture_output=True, text=True, timeout=1200
    )


def test_the_gitlab_kit_builds_raises_an_rfc_waits_for_approval_deploys_and_fails_a_bad_release(
    clean_small, tmp_path, gitlab_ci_local
):
    fleet = clean_small
    repo = project(tmp_path / "shop", fleet)
    shutil.copy(KITS / ".gitlab-ci.yml", repo / ".gitlab-ci.yml")
    git_repo(repo)

    run = _pipeline(gitlab_ci_local, repo)
    log = run.stdout + run.stderr
    assert run.returncode == 0, log[-6000:]
    for job in ("build", "change", "approve", "deploy"):
        assert f"{job} finished in" in log, log[-4000:]
    assert "drift-audit" not in log  # a push pipeline: the audit is for schedules
    assert [host_release(fleet, h) for h in ("h1", "h2")] == [rid("shop@1.0")] * 2
    from orchestrator.cms.models import RFC, Deployment

    dep = cms(lambda s: s.query(Deployment).one())
    assert dep.status == "succeeded" and dep.actor.startswith("gitlab:")
    ci = dep.evidence["ci"]
    assert ci["system"] == "gitlab" and ci["job"] == "deploy" and ci["pipeline_id"]
    assert (
        ci["commit"]
        == subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True
        ).stdout.strip()
    )
    rfc = cms(lambda s: s.get(RFC, dep.rfc_id))
    assert rfc.status == "implemented" and rfc.ci["job"] == "change"
    assert rfc.requester == dep.actor  # gitlab:<login>: what `roles:` lists

    # a broken release: its deploy job fails with exit 4, the JUnit names the failing check
    (fleet.root_dir("h1") / "shared").mkdir(exist_ok=True)
    (fleet.root_dir("h1") / "shared" / "broken-2.0").write_text("")
    bad = _pipeline(gitlab_ci_local, repo, "--variable", "RELEASE_VERSION=2.0")
    log = bad.stdout + bad.stderr
    assert bad.returncode != 0, log[-4000:]
    # gitlab-ci-local's summary line of the failed job names its exit code
    assert re.search(r"^deploy finished in [^\n]* FAIL 4\b", log, re.M), log[-4000:]
    assert re.search(r"^build finished in", log, re.M)
    reports = list(repo.rglob("junit-deploy.xml"))
    assert reports, "no JUnit report kept"
    suite = ET.parse(max(reports, key=lambda p: p.stat().st_mtime)).getroot().find("testsuite")
    failed = {
        c.get("name"): c.find("failure")
        for c in suite.iter("testcase")
        if c.find("failure") is not None
    }
    assert set(failed) == {"h1: steps and checks", "milestone 1"}
    assert "broken-{{ version }}" in failed["h1: steps and checks"].get("message")
    assert host_release(fleet, "h1") == rid("shop@1.0")  # backed out

    # the scheduled pipeline runs only the drift audit, which finds every host as deployed
    (fleet.root_dir("h1") / "shared" / "broken-2.0").unlink()
    audit = _pipeline(gitlab_ci_local, repo, "--variable", "CI_PIPELINE_SOURCE=schedule")
    log = audit.stdout + audit.stderr
    assert audit.returncode == 0, log[-4000:]
    assert "drift-audit finished in" in log and "build finished in" not in log
    drift = max(repo.rglob("junit-drift.xml"), key=lambda p: p.stat().st_mtime)
    suite = ET.parse(drift).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert suite.get("failures") == "0" and suite.get("tests") == str(len(fleet.hosts))
    managed = [n for n, c in cases.items() if c.find("skipped") is None]
    assert sorted(managed) == ["h1", "h2"]  # the rest have no baseline: skipped, not failed
