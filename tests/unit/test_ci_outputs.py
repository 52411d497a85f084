"""What a CI job gets from Ferry: provenance from its variables, GitHub step outputs, step
summary and annotations, a GitLab dotenv file, and JUnit XML reports."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from orchestrator import ci, junit

GITLAB = {
    "GITLAB_CI": "true", "CI_PIPELINE_ID": "812", "CI_PIPELINE_URL": "https://gl/p/-/pipelines/812",
    "CI_JOB_NAME": "deploy", "CI_JOB_ID": "4411", "CI_JOB_URL": "https://gl/p/-/jobs/4411",
    "CI_COMMIT_SHA": "0a1b2c", "CI_COMMIT_REF_NAME": "main", "CI_PROJECT_PATH": "ops/shop",
    "GITLAB_USER_LOGIN": "rel",
}  # fmt: skip
GITHUB = {
    "GITHUB_ACTIONS": "true", "GITHUB_RUN_ID": "99", "GITHUB_RUN_ATTEMPT": "2",
    "GITHUB_SERVER_URL": "https://github.com", "GITHUB_REPOSITORY": "ops/shop",
    "GITHUB_WORKFLOW": "release", "GITHUB_JOB": "deploy", "GITHUB_SHA": "fe12",
    "GITHUB_ACTOR": "rel", "GITHUB_REF_NAME": "main",
}  # fmt: skip


def test_provenance_names_pipeline_job_commit_and_actor_of_each_ci_and_none_outside():
    assert ci.provenance(GITLAB) == {
        "system": "gitlab", "pipeline_id": "812", "pipeline_url": "https://gl/p/-/pipelines/812",
        "job": "deploy", "job_id": "4411", "job_url": "https://gl/p/-/jobs/4411",
        "commit": "0a1b2c", "ref": "main", "project": "ops/shop", "actor": "rel",
    }  # fmt: skip
    gh = ci.provenance(GITHUB)
    assert gh is not None
    assert gh["pipeline_url"] == "https://github.com/ops/shop/actions/runs/99"
    assert (gh["system"], gh["job"], gh["commit"], gh["actor"]) == (
        "github",
        "deploy",
        "fe12",
        "rel",
    )
    assert ci.provenance({"HOME": "/root"}) is None


def test_github_gets_outputs_a_summary_and_error_annotations(tmp_path, capsys):
    env = {
        **GITHUB,
        "GITHUB_OUTPUT": str(tmp_path / "out"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "sum"),
    }
    (tmp_path / "out").write_text("earlier=1\n")
    ci.publish(
        {"deployment_id": 7, "status": "backed-out", "digest": "sha256:ab", "rfc": None},
        summary="### Ferry deployment 7",
        errors=[("ferry deploy: h1", "check: exit 1\nsecond line, 100%")],
        env=env,
    )
    assert (tmp_path / "out").read_text() == (
        "earlier=1\ndeployment_id=7\nstatus=backed-out\ndigest=sha256:ab\n"
    )
    assert (tmp_path / "sum").read_text() == "### Ferry deployment 7\n\n"
    err = capsys.readouterr().err
    # one line: the newline and the percent sign are escaped as GitHub requires
    assert err == "::error title=ferry deploy%3A h1::check: exit 1%0Asecond line, 100%25\n"


def test_gitlab_gets_a_dotenv_file_that_later_commands_update(tmp_path, capsys):
    env = {**GITLAB, "FERRY_DOTENV": str(tmp_path / "ferry.env")}
    ci.publish({"rfc": 3, "release": "shop@1.0"}, env=env)
    ci.publish({"deployment_id": 9, "status": "succeeded", "rfc": 3}, summary="x", env=env)
    assert (tmp_path / "ferry.env").read_text() == (
        "FERRY_RFC=3\nFERRY_RELEASE=shop@1.0\nFERRY_DEPLOYMENT_ID=9\nFERRY_STATUS=succeeded\n"
    )
    assert capsys.readouterr().err == ""  # no GitHub annotations on GitLab


def test_outside_ci_nothing_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ci.publish({"status": "ok"}, summary="s", errors=[("t", "m")], env={})
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""


REPORT = {
    "id": 4, "status": "backed-out", "release": "shop@2.0", "environment": "dev",
    "waves": [["h1"], ["h2", "h3"]],
    "hosts": {
        "h1": {"status": "backed-out", "release": "shop@1.0",
               "failure": {"step": "check", "reason": "check 1 failed: exit 1", "kind": None}},
        "h2": {"status": "untouched", "release": "shop@1.0"},
        "h3": {"status": "untouched", "release": "shop@1.0"},
    },
    "milestones": [{"wave": 1, "passed": False, "reason": "1/1 failed (allowed 0): h1"}],
    "outcomes": [{"host": "h1", "ok": False, "output": "test ! -e broken-2.0: exit 1"}],
}  # fmt: skip


def test_a_deployments_junit_has_a_case_per_host_and_milestone_with_failures_and_output(
    tmp_path,
):
    path = tmp_path / "r" / "junit.xml"
    junit.write(path, junit.deployment_suite(REPORT))
    root = ET.parse(path).getroot()
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("4", "2", "2")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    assert list(cases) == [
        "h1: steps and checks", "h2: steps and checks", "h3: steps and checks", "milestone 1",
    ]  # fmt: skip
    failure = cases["h1: steps and checks"].find("failure")
    assert failure is not None and failure.get("message") == "check: check 1 failed: exit 1"
    assert "test ! -e broken-2.0: exit 1" in (failure.text or "")
    assert cases["h2: steps and checks"].find("skipped") is not None
    assert cases["milestone 1"].find("failure").get("message") == "1/1 failed (allowed 0): h1"


def test_a_drift_audits_junit_has_a_case_per_host():
    data = {
        "environment": "dev",
        "hosts": {
            "h1": {"state": "ok", "detail": ""},
            "h2": {"state": "drifted", "detail": "x"},
            "h3": {"state": "unmanaged", "detail": "no baseline"},
        },
    }
    suite = junit.drift_suite(data)
    suite.update_statistics()
    assert (suite.tests, suite.failures, suite.skipped) == (3, 1, 1)
