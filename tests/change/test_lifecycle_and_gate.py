"""RFC lifecycle and the gate against a real CMS (SQLite in the test's Ferry home)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from orchestrator.change import gate, lifecycle, rfcs
from orchestrator.change.lifecycle import OPEN, STATUSES, TRANSITIONS, can_move
from orchestrator.change.models import RfcRequest
from orchestrator.cms import audit, db
from orchestrator.cms.models import Deployment
from orchestrator.errors import AuthorizationRefused, BadInput

T0 = datetime(2030, 6, 1, 9, 0, tzinfo=UTC)  # a Saturday, long before the windows below
IN_PROD_WINDOW = datetime(2030, 6, 4, 21, 0, tzinfo=UTC)  # Tue 23:00 Berlin
OUT_OF_PROD_WINDOW = datetime(2030, 6, 5, 12, 0, tzinfo=UTC)


def raise_rfc(s, models, calendar, actor="alice", now=T0, **fields):
    req = RfcRequest.model_validate(
        {"release": "web@1.0", "environment": "prod", "model": "normal", **fields}
    )
    rfc, _ = rfcs.create(s, req, actor=actor, now=now, models=models, calendar=calendar)
    return rfc.id


def authorized_rfc(models, calendar, **fields) -> int:
    with db.session_scope() as s:
        rid = raise_rfc(s, models, calendar, **fields)
        rfcs.submit(s, rid, actor="alice", now=T0, models=models, calendar=calendar)
        for who in ("dave", "erin") if fields.get("model") == "emergency" else ("dave", "carol"):
            role = "ecab" if who == "erin" else "cab"
            if fields.get("model") == "emergency" and who == "dave":
                continue
            rfcs.approve(s, rid, actor=who, role=role, comment="", now=T0, models=models)
    return rid


def check(rid: int, now: datetime, models, calendar, **kw):
    args = {"stage": "deploy", "release": "web@1.0", "environment": "prod", **kw}
    with db.session_scope() as s:
        return gate.check(
            s, rfc_id=rid, now=now, actor="deployer", models=models, calendar=calendar, **args
        )


def test_every_path_to_implementing_passes_through_authorized():
    reachable, todo = {"draft"}, ["draft"]
    while todo:
        here = todo.pop()
        for nxt in STATUSES:
            if nxt != "authorized" and can_move(here, nxt) and nxt not in reachable:
                reachable.add(nxt)
                todo.append(nxt)
    assert "implementing" not in reachable and "scheduled" not in reachable


def test_cancel_only_from_open_states_and_final_states_are_final():
    for status in STATUSES:
        assert can_move(status, "cancelled") == (status in OPEN or status == "cancelled")
    assert TRANSITIONS["closed"] == TRANSITIONS["cancelled"] == frozenset()


def test_a_normal_change_is_authorized_by_its_approvals_and_deploys_in_its_window(
    ferry_home, models, calendar
):
    rid = authorized_rfc(models, calendar, hosts=["web-*"])
    assert check(rid, IN_PROD_WINDOW, models, calendar, hosts=["web-1"]).allowed
    refused = check(rid, OUT_OF_PROD_WINDOW, models, calendar, hosts=["web-1"])
    assert not refused.allowed and "outside prod's change windows" in refused.reasons[0]
    with db.session_scope() as s:
        history = audit.history(s, "rfc", rid)
    actions = [e["action"] for e in history]
    assert actions[:3] == ["rfc.created", "rfc.submitted", "rfc.assessed"]
    assert actions[-2:] == ["authorize.allowed", "authorize.refused"]
    assert "rfc.authorized" in actions and actions.count("rfc.approval") == 2


def test_require_raises_with_every_reason_and_the_refusal_survives_the_callers_rollback(
    ferry_home, models, calendar
):
    rid = authorized_rfc(models, calendar, hosts=["web-*"])
    with pytest.raises(AuthorizationRefused) as err, db.session_scope() as s:
        gate.require(
            s,
            rfc_id=f"RFC-{rid}",
            stage="deploy",
            release="api@2.0",
            environment="prod",
            hosts=["db1"],
            now=OUT_OF_PROD_WINDOW,
            actor="deployer",
            models=models,
            calendar=calendar,
        )
    assert err.value.exit_code == 3
    assert len(err.value.reasons) == 3  # release, host, window
    with db.session_scope() as s:
        last = audit.history(s, "rfc", rid)[-1]
    assert last["action"] == "authorize.refused" and last["data"]["reasons"] == err.value.reasons


def test_the_gate_refuses_an_unknown_rfc_and_records_it(ferry_home, models, calendar):
    d = check(999, IN_PROD_WINDOW, models, calendar)
    assert not d.allowed and d.reasons == ["RFC-999 does not exist"]
    assert gate.parse_rfc_id("RFC-12") == gate.parse_rfc_id("12") == gate.parse_rfc_id(12) == 12
    with pytest.raises(BadInput):
        gate.parse_rfc_id("twelve")


def test_self_approval_and_approval_after_rejection_are_refused_and_recorded(
    ferry_home, models, calendar
):
    with db.session_scope() as s:
        rid = raise_rfc(s, models, calendar)
        rfcs.submit(s, rid, actor="alice", now=T0, models=models, calendar=calendar)
    with pytest.raises(AuthorizationRefused, match="separation of duties"), db.session_scope() as s:
        rfcs.approve(s, rid, actor="alice", role=None, comment="", now=T0, models=models)
    with pytest.raises(AuthorizationRefused, match="does not hold the cab role"):
        with db.session_scope() as s:
            rfcs.approve(s, rid, actor="bob", role="cab", comment="", now=T0, models=models)
    with db.session_scope() as s:
        rfcs.reject(
            s, rid, actor="dave", role="cab", comment="no backout plan", now=T0, models=models
        )
    with pytest.raises(AuthorizationRefused, match="was rejected"), db.session_scope() as s:
        rfcs.approve(s, rid, actor="carol", role="cab", comment="", now=T0, models=models)
    with db.session_scope() as s:
        actions = [e["action"] for e in audit.history(s, "rfc", rid)]
        assert lifecycle.get_rfc(s, rid).status == "rejected"
    assert actions.count("rfc.approve.refused") == 3 and "rfc.rejected" in actions


def test_implementation_repeats_are_idempotent_and_a_backed_out_change_needs_a_new_rfc(
    ferry_home, models, calendar
):
    rid = authorized_rfc(models, calendar)
    with db.session_scope() as s:
        for status in (
            "implementing",
            "implementing",
            "implemented",
            "implemented",
            "implementing",
            "backed-out",
        ):
            lifecycle.transition(s, rid, status, actor="deployer", data={"deployment": 1})
    with pytest.raises(AuthorizationRefused, match="needs a new RFC"), db.session_scope() as s:
        lifecycle.transition(s, rid, "implementing", actor="deployer")
    assert not check(rid, IN_PROD_WINDOW, models, calendar).allowed  # backed-out: no more
    with db.session_scope() as s:
        history = audit.history(s, "rfc", rid)
        repeats = [e for e in history if e["data"].get("repeat")]
        assert len(repeats) == 2 and lifecycle.get_rfc(s, rid).status == "backed-out"
        assert history[-2]["action"] == "rfc.transition.refused"


def test_an_emergency_change_deploys_outside_windows_and_is_flagged_for_review(
    ferry_home, models, calendar
):
    rid = authorized_rfc(models, calendar, model="emergency")
    d = check(rid, OUT_OF_PROD_WINDOW, models, calendar)
    assert d.allowed, d.reasons
    with db.session_scope() as s:
        lifecycle.transition(
            s, rid, "implementing", actor="deployer", models=models, now=OUT_OF_PROD_WINDOW
        )
        rfc = lifecycle.transition(
            s, rid, "implemented", actor="deployer", models=models, now=OUT_OF_PROD_WINDOW
        )
        assert rfc.needs_review and rfc.review_due == OUT_OF_PROD_WINDOW + timedelta(days=5)
        assert [r["id"] for r in rfcs.list_rfcs(s, needs_review=True)] == [rid]
    with pytest.raises(AuthorizationRefused, match="review"), db.session_scope() as s:
        rfcs.close(s, rid, actor="erin", comment="", now=OUT_OF_PROD_WINDOW)
    with db.session_scope() as s:
        rfcs.close(s, rid, actor="erin", comment="root cause: expired cert; fine", now=T0)
        assert rfcs.list_rfcs(s, needs_review=True) == []


def test_a_standard_change_fitting_its_template_is_authorized_when_raised(
    ferry_home, models, calendar
):
    with db.session_scope() as s:
        rid = raise_rfc(
            s,
            models,
            calendar,
            environment="stage",
            model="standard",
            template="web-staging",
            hosts=["web-1"],
        )
        assert lifecycle.get_rfc(s, rid).status == "authorized"
    stage_day = datetime(2030, 6, 5, 12, 0, tzinfo=UTC)  # Wed noon: inside Mon-Fri 08-18
    assert check(rid, stage_day, models, calendar, environment="stage").allowed
    with pytest.raises(AuthorizationRefused, match="environment prod is not one of"):
        with db.session_scope() as s:
            raise_rfc(s, models, calendar, model="standard", template="web-staging")


def test_risk_counts_recent_failed_deployments_in_the_environment(ferry_home, models, calendar):
    with db.session_scope() as s:
        for status in ("failed", "backed-out", "succeeded"):
            s.add(
                Deployment(
                    release="web@0.9",
                    package_digest="x",
                    environment="dev",
                    plan_file="p",
                    strategy="s",
                    method="push",
                    status=status,
                    actor="a",
                    started_at=T0 - timedelta(days=2),
                )
            )
        rid = raise_rfc(s, models, calendar, environment="dev", hosts=["web-1"])
        rfc = lifecycle.get_rfc(s, rid)
        failures = next(f for f in rfc.risk_factors if f["factor"] == "recent_failures")
    assert failures["value"] == 2 and failures["points"] == 4


def test_submit_refuses_a_window_outside_the_calendar_and_reports_conflicts(
    ferry_home, models, calendar
):
    inside = IN_PROD_WINDOW.isoformat() + "/" + (IN_PROD_WINDOW + timedelta(hours=1)).isoformat()
    outside = (
        OUT_OF_PROD_WINDOW.isoformat() + "/" + (OUT_OF_PROD_WINDOW + timedelta(hours=1)).isoformat()
    )
    with db.session_scope() as s:
        bad = raise_rfc(s, models, calendar, windows=[outside])
    with pytest.raises(AuthorizationRefused, match="not inside a change window"):
        with db.session_scope() as s:
            rfcs.submit(s, bad, actor="alice", now=T0, models=models, calendar=calendar)
    with db.session_scope() as s:
        first = raise_rfc(s, models, calendar, windows=[inside], hosts=["web-*"])
        second = raise_rfc(s, models, calendar, windows=[inside], hosts=["web-2"])
        rfcs.submit(s, first, actor="alice", now=T0, models=models, calendar=calendar)
        warnings = rfcs.submit(s, second, actor="alice", now=T0, models=models, calendar=calendar)
        assert any(f"RFC-{first}" in w for w in warnings)
        assert "rfc.conflict" in [e["action"] for e in audit.history(s, "rfc", first)]
