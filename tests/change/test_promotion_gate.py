"""The change gate meets the release lifecycle (real CMS, SQLite): an unmet promotion rule
refuses, naming what is missing; only an ECAB-authorized emergency change passes it, and
then it is flagged for review and the bypass is on record."""

from __future__ import annotations

from orchestrator.change import lifecycle
from orchestrator.change.promotion import Lifecycle
from orchestrator.cms import audit, db
from tests.change.test_lifecycle_and_gate import (
    IN_PROD_WINDOW,
    T0,
    authorized_rfc,
    check,
    raise_rfc,
)

RULES = Lifecycle.model_validate({"promotion": {"prod": {"after": ["stage"]}}})
DIGEST = "sha256:" + "12" * 32


def test_a_normal_change_is_refused_until_the_package_succeeded_in_the_earlier_environment(
    ferry_home, models, calendar
):
    rid = authorized_rfc(models, calendar)
    free = check(rid, IN_PROD_WINDOW, models, calendar, digest=DIGEST)  # no lifecycle file
    assert free.allowed, free.reasons
    d = check(rid, IN_PROD_WINDOW, models, calendar, digest=DIGEST, lifecycle=RULES)
    assert not d.allowed
    assert d.reasons == [
        "promotion to prod: package 121212121212 has not succeeded in stage "
        "(deploy the same package there)"
    ]
    # the check-in stage meets the same rule, for the RFC's environment
    c = check(rid, T0, models, calendar, stage="checkin", environment=None, digest=DIGEST,
              lifecycle=RULES)  # fmt: skip
    assert not c.allowed and "not succeeded in stage" in c.reasons[-1]
    with db.session_scope() as s:
        last = audit.history(s, "rfc", rid)[-1]
        assert last["action"] == "authorize.refused" and "stage" in last["data"]["reasons"][-1]


def test_only_an_ecab_authorized_emergency_change_bypasses_it_flagged_for_review(
    ferry_home, models, calendar
):
    with db.session_scope() as s:
        unapproved = raise_rfc(s, models, calendar, model="emergency")
    d = check(unapproved, IN_PROD_WINDOW, models, calendar, digest=DIGEST, lifecycle=RULES)
    assert not d.allowed and any("not succeeded in stage" in r for r in d.reasons)

    rid = authorized_rfc(models, calendar, model="emergency")
    d = check(rid, IN_PROD_WINDOW, models, calendar, digest=DIGEST, lifecycle=RULES)
    assert d.allowed, d.reasons
    assert any("promotion rule bypassed, flagged for review" in r for r in d.reasons)
    with db.session_scope() as s:
        rfc = lifecycle.get_rfc(s, rid)
        assert rfc.needs_review and rfc.review_due is not None
        last = audit.history(s, "rfc", rid)[-1]
        assert last["action"] == "authorize.allowed"
        assert "not succeeded in stage" in last["data"]["promotion_overridden"][0]
