"""Approvals and RFC statuses bound to the audit chain, on SQLite and PostgreSQL: rows
inserted or edited with SQL (forged approvals, status='authorized') do not authorize
anything, and `ferry cms verify-audit` names each of them; approvals made through Ferry
still count."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from orchestrator.change import rfcs
from orchestrator.cms import db
from orchestrator.cms.models import RFC, Approval
from orchestrator.settings import reset_settings
from tests.change.test_lifecycle_and_gate import (
    IN_PROD_WINDOW,
    T0,
    authorized_rfc,
    check,
    raise_rfc,
)
from tests.pg import fresh_postgres_url, postgres_server  # noqa: F401


@pytest.fixture(params=["sqlite", "postgresql"])
def cms(request, ferry_home, monkeypatch):
    if request.param == "postgresql":
        monkeypatch.setenv("FERRY_DATABASE_URL", request.getfixturevalue("fresh_postgres_url"))
        reset_settings()
        db.dispose_all()
    yield
    db.dispose_all()


def _forge(models, calendar) -> int:
    """A normal change, submitted, then 'approved' and 'authorized' by SQL alone."""
    with db.session_scope() as s:
        rid = raise_rfc(s, models, calendar, hosts=["web-*"])
        rfcs.submit(s, rid, actor="alice", now=T0, models=models, calendar=calendar)
    with db.session_scope() as s:
        for who in ("carol", "dave"):
            s.execute(
                sa.insert(Approval).values(
                    rfc_id=rid, approver=who, role="cab", decision="approved", comment="",
                    created_at=T0,
                )
            )  # fmt: skip
        s.execute(sa.update(RFC).where(RFC.id == rid).values(status="authorized", authorized_at=T0))
    return rid


def test_forged_approvals_and_status_do_not_authorize_and_verify_audit_names_them(
    cms,
    models,
    calendar,
    ferry_cli,
    change_files,
):
    genuine = authorized_rfc(models, calendar, hosts=["web-*"])
    assert check(genuine, IN_PROD_WINDOW, models, calendar, hosts=["web-1"]).allowed
    clean = ferry_cli("cms", "verify-audit", "-o", "json")
    assert clean.returncode == 0, clean.stderr
    assert clean.json()["unbound"] == []

    forged = _forge(models, calendar)
    decision = check(forged, IN_PROD_WINDOW, models, calendar, hosts=["web-1"])
    assert not decision.allowed
    assert f"RFC-{forged} is assessed, not authorized" in decision.reasons
    with db.session_scope() as s:
        ids = list(s.scalars(sa.select(Approval.id).where(Approval.rfc_id == forged)))
    assert len(ids) == 2
    for aid in ids:
        assert any(f"approval {aid} (approved by" in r for r in decision.reasons), decision.reasons
    # the genuine RFC still passes beside the forged one
    assert check(genuine, IN_PROD_WINDOW, models, calendar, hosts=["web-1"]).allowed

    res = ferry_cli("cms", "verify-audit", "-o", "json")
    assert res.returncode == 6
    unbound = res.json()["details"]["unbound"]
    assert unbound == [
        f"RFC-{forged}: approval {ids[0]} (approved by carol as cab) has no matching audit "
        "event: not counted",
        f"RFC-{forged}: approval {ids[1]} (approved by dave as cab) has no matching audit "
        "event: not counted",
        f"RFC-{forged}: status 'authorized' has no matching audit event (the audit log last "
        "moved it to 'assessed')",
    ]
    text = ferry_cli("cms", "verify-audit")
    assert text.returncode == 6 and "3 CMS row(s) have no matching audit event" in text.stderr


def test_an_approval_row_edited_to_another_approver_no_longer_counts(
    cms,
    models,
    calendar,
    ferry_cli,
    change_files,
):
    rid = authorized_rfc(models, calendar, hosts=["web-*"])
    with db.session_scope() as s:  # re-attribute dave's approval to mallory
        s.execute(
            sa.update(Approval)
            .where(Approval.rfc_id == rid, Approval.approver == "dave")
            .values(approver="mallory")
        )
    res = ferry_cli("cms", "verify-audit", "-o", "json")
    assert res.returncode == 6
    (line,) = res.json()["details"]["unbound"]
    assert "(approved by mallory as cab) has no matching audit event" in line
    # a high-risk change needs two cab approvals: only carol's counts now
    with db.session_scope() as s:
        assert s.get(RFC, rid).risk == "high"
    decision = check(rid, IN_PROD_WINDOW, models, calendar, hosts=["web-1"])
    assert not decision.allowed
    assert (
        "needs 2 approvals, including one with role cab; has 1 (carol as cab)"
        in decision.reasons[0]
    )
