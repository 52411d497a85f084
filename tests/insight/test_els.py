"""Early life support, per-stage approvals and the post-implementation review, on the lab
fleet through the real CLI."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from orchestrator.cms.models import Deployment
from tests.deploy.helpers import build, cms, deploy, plan
from tests.insight.helpers import change_files, normal_rfc, ok, standard_rfc

pytestmark = pytest.mark.fleet

PERIOD = 40  # seconds: long enough for two check runs on a loaded machine


def test_an_els_check_that_starts_failing_inside_the_period_is_recorded_and_reported(
    clean_small, run_ferry, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    change_files(work, monkeypatch)
    build(work, "1.0")
    els = {"period": f"{PERIOD}s", "every": "1s",
           "checks": [{"command": "test ! -e {{ shared }}/els-broken"}]}  # fmt: skip
    p = plan(work, fleet, "els.yaml", environment="staging", targets="h1,h2",
             strategy="big-bang", waves=None, els=els)  # fmt: skip
    rfc_id = standard_rfc(run_ferry, "shop@1.0")
    dep = ok(deploy(run_ferry, p, "shop@1.0", rfc_id))["id"]

    first = run_ferry("els", "run", "-o", "json")
    assert first.returncode == 0, first.stdout + first.stderr
    (row,) = first.json()["deployments"]
    assert (row["deployment"], row["action"], row["failed"]) == (dep, "run", [])
    assert sorted(row["hosts"]) == ["h1", "h2"]

    (fleet.root_dir("h2") / "shared" / "els-broken").write_text("")  # h2 starts failing
    time.sleep(1.2)
    second = run_ferry("els", "run", "-o", "json")
    assert second.returncode == 5, second.stdout + second.stderr
    (row,) = second.json()["deployments"]
    assert row["action"] == "run" and row["failed"] == ["h2"]
    assert f"ferry remediate backout {dep}" in second.stderr
    assert "FAILED" in " ".join(row["hosts"]["h2"]) and "FAILED" not in " ".join(row["hosts"]["h1"])

    during = ok(run_ferry("report", "-o", "json"))["els"]["rows"]
    assert [(r["deployment"], r["outcome"], r["runs"]) for r in during] == [(dep, "in-progress", 2)]
    assert [f["failed"] for f in during[0]["failures"]] == [["h2"]]

    finished = cms(lambda s: s.get(Deployment, dep).finished_at)
    wait = (finished + timedelta(seconds=PERIOD + 0.5) - datetime.now(UTC)).total_seconds()
    assert wait > 0, "the period ended before the second run: raise PERIOD"
    time.sleep(wait)
    closing = run_ferry("els", "run", "-o", "json")
    assert closing.returncode == 0, closing.stdout + closing.stderr
    (row,) = closing.json()["deployments"]
    assert row["action"] == "close" and row["outcome"]["outcome"] == "failed"
    assert row["outcome"]["runs"] == 2 and row["outcome"]["failed_runs"] == 1

    after = ok(run_ferry("report", "-o", "json"))
    assert [(r["deployment"], r["outcome"]) for r in after["els"]["rows"]] == [(dep, "failed")]
    assert after["dashboard"]["recent_deployments"][0]["els"] == "failed"
    evidence = cms(lambda s: s.get(Deployment, dep).evidence["els"])
    assert evidence["outcome"]["outcome"] == "failed" and len(evidence["runs"]) == 2
    shown = run_ferry("status", "--deployment", str(dep))
    assert "early life support: failed (2 run(s), 1 failed" in shown.stdout, shown.stdout
    # the period is over: nothing more runs
    assert ok(run_ferry("els", "run", "-o", "json"))["deployments"] == []
    # the post-implementation review carries the ELS result with the change's own figures
    closed = ok(run_ferry("rfc", "close", rfc_id, "-m", "ELS found h2 failing", "-o", "json"))
    figures = closed["review"]["figures"]
    assert (figures["outcome"], figures["hosts"], figures["els"]) == ("successful", 2, "failed")


def test_a_model_approving_each_stage_refuses_a_deployment_whose_checkin_alone_was_approved(
    clean_small, run_ferry, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    change_files(work, monkeypatch, approve_each_stage=True, review_before_close=True)
    build(work, "1.0")
    p = plan(work, fleet, "prod.yaml", environment="production", targets="h7,h8",
             strategy="big-bang", waves=None)  # fmt: skip
    rfc_id = normal_rfc(run_ferry, "shop@1.0", approve=False)
    carol = {"FERRY_USER": "carol"}
    no_stage = run_ferry("rfc", "approve", rfc_id, env=carol)
    assert no_stage.returncode == 2 and "--stage" in no_stage.stderr, no_stage.stderr
    checkin = ok(run_ferry("rfc", "approve", rfc_id, "--stage", "checkin", "-o", "json", env=carol))
    assert checkin["status"] == "authorized"
    assert [(a["approver"], a["stage"]) for a in checkin["approvals"]] == [("carol", "checkin")]

    refused = deploy(run_ferry, p, "shop@1.0", rfc_id)
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "for the deploy stage" in refused.stderr
    assert refused.json()["status"] == "refused"
    assert not (fleet.root_dir("h7") / "current").exists()
    assert not (fleet.root_dir("h8") / "current").exists()

    ok(run_ferry("rfc", "approve", rfc_id, "--stage", "deploy", "-o", "json", env=carol))
    done = deploy(run_ferry, p, "shop@1.0", rfc_id)
    assert done.returncode == 0, done.stdout + done.stderr
    statuses = cms(
        lambda s: [d.status for d in s.scalars(select(Deployment).order_by(Deployment.id))]
    )
    assert statuses == ["refused", "succeeded"]

    # the model requires a post-implementation review before a normal change closes
    unreviewed = run_ferry("rfc", "close", rfc_id)
    assert unreviewed.returncode == 3 and "post-implementation review" in unreviewed.stderr
    closed = ok(run_ferry("rfc", "close", rfc_id, "-m", "as planned", "-o", "json"))
    assert closed["status"] == "closed"
    figures = closed["review"]["figures"]
    assert (figures["outcome"], figures["hosts"], figures["waves"]) == ("successful", 2, 1)
    assert figures["failed_milestones"] == 0 and not figures["backed_out"]
    shown = ok(run_ferry("rfc", "show", rfc_id, "-o", "json"))
    review = [e for e in shown["history"] if e["action"] == "rfc.closed"][0]["data"]["review"]
    assert review["comment"] == "as planned" and review["figures"] == figures
