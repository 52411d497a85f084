"""`authorize()` as a specification: properties over every RFC snapshot hypothesis can build.

The oracle below restates the change models' rules independently and simply; whatever
`authorize` allows must satisfy it. Targeted properties then show each single violation
(self-approval, rejection, wrong release/environment/host, outside a window, blackout) is
refused whatever else is true of the RFC.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase

from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.change.authorize import AUTHORIZING, ApprovalView, RfcView, authorize
from orchestrator.change.calendar import Calendar
from orchestrator.change.lifecycle import STATUSES
from orchestrator.change.models import RISK_ORDER, ChangeModels
from tests.change.conftest import CALENDAR, MODELS

M = ChangeModels.model_validate(MODELS)
CAL = Calendar.model_validate(CALENDAR)

# Tuesday 2030-06-04, 23:00 in Berlin (21:00 UTC): inside prod's "Tue,Thu 22:00-02:00"
IN_PROD_WINDOW = datetime(2030, 6, 4, 21, 0, tzinfo=UTC)
# Wednesday 2030-06-05 12:00 UTC: outside prod's windows, inside stage's Mon-Fri 08-18
OUT_OF_PROD_WINDOW = datetime(2030, 6, 5, 12, 0, tzinfo=UTC)
# Tuesday 2030-12-24 23:00 Berlin: inside prod's window *and* its year-end blackout
IN_BLACKOUT = datetime(2030, 12, 24, 22, 0, tzinfo=UTC)
LONG_AGO = datetime(2030, 1, 1, tzinfo=UTC)
OWN_WINDOW = (IN_PROD_WINDOW - timedelta(minutes=30), IN_PROD_WINDOW + timedelta(hours=2))

USERS = ["alice", "bob", "carol", "dave", "erin", "mallory"]
approvals = st.lists(
    st.builds(
        ApprovalView,
        approver=st.sampled_from(USERS),
        role=st.sampled_from(["cab", "ecab", "change-manager", "peer"]),
        decision=st.sampled_from(["approved", "approved", "rejected"]),
    ),
    max_size=5,
).map(tuple)

views = st.builds(
    RfcView,
    id=st.just(7),
    release=st.sampled_from(["web@1.0", "db@2.0"]),
    environment=st.sampled_from(["prod", "stage", "dev", "elsewhere"]),
    model=st.sampled_from(["standard", "normal", "emergency"]),
    status=st.sampled_from(STATUSES),
    requester=st.just("alice"),
    risk=st.sampled_from(["low", "medium", "high"]),
    template=st.sampled_from([None, "web-staging", "missing"]),
    stages=st.sampled_from([("checkin", "deploy"), ("checkin",), ("plan", "checkin", "deploy")]),
    hosts=st.sampled_from([(), ("web-*",), ("db1", "db2")]),
    windows=st.sampled_from([(), (OWN_WINDOW,)]),
    approvals=approvals,
    submitted_at=st.sampled_from([None, LONG_AGO]),
)
moments = st.sampled_from([IN_PROD_WINDOW, OUT_OF_PROD_WINDOW, IN_BLACKOUT])
host_lists = st.sampled_from([None, [], ["web-1"], ["web-1", "db1"], ["db2"]])


def approvals_meet_model(v: RfcView) -> bool:
    """The oracle: the change model's approval rules, stated independently."""
    if any(a.decision == "rejected" for a in v.approvals):
        return False
    if v.model == "standard":
        t = next((t for t in M.models.standard.templates if t.name == v.template), None)
        return bool(
            t
            and fnmatchcase(v.release.split("@")[0], t.release)
            and v.environment in t.environments
            and RISK_ORDER[v.risk] <= RISK_ORDER[t.max_risk]
            and set(v.stages) <= set(t.stages)
        )
    rule = (
        M.models.emergency.approvals
        if v.model == "emergency"
        else M.models.normal.approvals[v.risk]
    )  # type: ignore[index]
    good = [
        a
        for a in v.approvals
        if a.decision == "approved" and a.approver != v.requester and a.role in M.roles[a.approver]
    ]
    enough = len({a.approver for a in good}) >= rule.count
    return enough and (not rule.roles or any(a.role in rule.roles for a in good))


def deploy(v: RfcView, now: datetime, hosts: list[str] | None = None, **kw: object):
    args = {"environment": v.environment, "release": v.release, **kw}
    return authorize(v, "deploy", args["environment"], hosts, args["release"], now, M, CAL)


@settings(max_examples=600)
@given(v=views, now=moments, hosts=host_lists, stage=st.sampled_from(["plan", "checkin", "deploy"]))
def test_nothing_is_allowed_without_what_the_change_model_requires(v, now, hosts, stage):
    d = authorize(v, stage, v.environment, hosts, v.release, now, M, CAL)
    assert d.reasons, "every decision gives its reasons"
    if not d.allowed:
        return
    assert v.status in AUTHORIZING
    assert approvals_meet_model(v)
    assert stage in v.stages
    if stage == "deploy":
        if v.hosts and hosts:
            assert all(any(fnmatchcase(h, p) for p in v.hosts) for h in hosts)
        if v.windows:
            assert any(a <= now < b for a, b in v.windows)
        if v.model != "emergency":
            assert CAL.window_at(v.environment, now) is not None
            assert CAL.blackout_at(v.environment, now) is None


@given(v=views, now=moments)
def test_self_approval_never_counts(v, now):
    own = tuple(replace(a, approver=v.requester, decision="approved") for a in v.approvals)
    v = replace(v, model="normal", approvals=own, status="authorized")
    d = deploy(v, now)
    assert not d.allowed
    assert any("has 0" in r for r in d.reasons)


@given(v=views, now=moments, rejecter=st.sampled_from(USERS))
def test_a_rejection_refuses_whatever_else_was_approved(v, now, rejecter):
    v = replace(v, approvals=(*v.approvals, ApprovalView(rejecter, "cab", "rejected")))
    d = deploy(v, now)
    assert not d.allowed
    assert any("rejected" in r for r in d.reasons)


@given(v=views, now=moments)
def test_a_release_other_than_the_rfcs_is_refused(v, now):
    d = deploy(v, now, release="other@9.9")
    assert not d.allowed and any("not other@9.9" in r for r in d.reasons)


@given(v=views, now=moments)
def test_an_environment_the_rfc_does_not_name_is_refused(v, now):
    d = deploy(v, now, environment="somewhere-else")
    assert not d.allowed and any("not somewhere-else" in r for r in d.reasons)


@given(v=views, now=moments)
def test_a_host_the_rfc_does_not_name_is_refused(v, now):
    v = replace(v, hosts=("web-*",))
    d = deploy(v, now, hosts=["web-1", "db-9"])
    assert not d.allowed and any("db-9" in r for r in d.reasons)


@given(v=views)
def test_deploys_outside_the_rfcs_own_window_are_refused(v):
    v = replace(v, windows=(OWN_WINDOW,))
    d = deploy(v, OWN_WINDOW[1] + timedelta(minutes=1))
    assert not d.allowed and any("outside RFC-7's windows" in r for r in d.reasons)


@given(v=views)
def test_non_emergency_deploys_outside_the_environment_window_are_refused(v):
    v = replace(v, model=v.model if v.model != "emergency" else "normal", environment="prod")
    d = deploy(v, OUT_OF_PROD_WINDOW)
    assert not d.allowed and any("outside prod's change windows" in r for r in d.reasons)


@given(v=views)
def test_non_emergency_deploys_during_a_blackout_are_refused(v):
    v = replace(v, model=v.model if v.model != "emergency" else "normal", environment="prod")
    d = deploy(v, IN_BLACKOUT)
    assert not d.allowed and any("blackout 'year-end'" in r for r in d.reasons)


def _authorized(**kw: object) -> RfcView:
    base = RfcView(
        id=7,
        release="web@1.0",
        environment="prod",
        model="normal",
        status="authorized",
        requester="alice",
        risk="high",
        submitted_at=LONG_AGO,
        approvals=(
            ApprovalView("dave", "cab", "approved"),
            ApprovalView("bob", "peer", "approved"),
        ),
    )
    return replace(base, **kw)


def test_a_fully_approved_normal_change_deploys_inside_its_window():
    d = deploy(_authorized(), IN_PROD_WINDOW, hosts=["web-1"])
    assert d.allowed, d.reasons
    assert any("inside prod's change window" in r for r in d.reasons)


def test_high_risk_needs_a_cab_member_among_its_two_approvers():
    v = _authorized(
        approvals=(
            ApprovalView("bob", "peer", "approved"),
            ApprovalView("carol", "change-manager", "approved"),
        )
    )
    d = deploy(v, IN_PROD_WINDOW)
    assert not d.allowed and any("approval by cab" in r for r in d.reasons)


def test_an_approval_in_a_role_the_approver_does_not_hold_does_not_count():
    v = _authorized(
        approvals=(ApprovalView("bob", "cab", "approved"), ApprovalView("dave", "cab", "approved"))
    )
    assert not deploy(v, IN_PROD_WINDOW).allowed


def test_an_emergency_change_deploys_outside_windows_and_during_blackouts():
    v = _authorized(model="emergency", approvals=(ApprovalView("erin", "ecab", "approved"),))
    for now in (OUT_OF_PROD_WINDOW, IN_BLACKOUT):
        d = deploy(v, now)
        assert d.allowed, d.reasons
        assert any("emergency change" in r for r in d.reasons)


def test_an_emergency_change_still_needs_the_ecab():
    v = _authorized(model="emergency", approvals=(ApprovalView("dave", "cab", "approved"),))
    assert not deploy(v, OUT_OF_PROD_WINDOW).allowed


def test_lead_time_counts_from_submission_to_the_window_start():
    late = IN_PROD_WINDOW - timedelta(hours=10)  # high risk needs 72h
    d = deploy(_authorized(submitted_at=late), IN_PROD_WINDOW)
    assert not d.allowed and any("72h lead time" in r for r in d.reasons)
    assert deploy(
        _authorized(
            submitted_at=late,
            model="emergency",
            approvals=(ApprovalView("erin", "ecab", "approved"),),
        ),
        IN_PROD_WINDOW,
    ).allowed


def test_a_window_closing_mid_rollout_refuses_the_next_wave():
    """The flow calls the gate before each wave: inside the window yes, one minute after no."""
    v = _authorized(windows=(OWN_WINDOW,))
    assert deploy(v, OWN_WINDOW[1] - timedelta(minutes=1), hosts=["web-1"]).allowed
    assert not deploy(v, OWN_WINDOW[1] + timedelta(minutes=1), hosts=["web-2"]).allowed


def test_checkin_needs_authorization_but_no_window():
    v = _authorized()
    d = authorize(v, "checkin", None, None, "web@1.0", OUT_OF_PROD_WINDOW, M, CAL)
    assert d.allowed, d.reasons
    d = authorize(
        replace(v, status="assessed"), "checkin", None, None, "web@1.0", OUT_OF_PROD_WINDOW, M, CAL
    )
    assert not d.allowed


def test_a_refusal_lists_every_reason_at_once():
    v = _authorized(status="assessed", approvals=())
    d = authorize(v, "deploy", "stage", ["x"], "db@1", OUT_OF_PROD_WINDOW, M, CAL)
    text = " | ".join(d.reasons)
    for part in ("not authorized", "needs 2 approvals", "not db@1", "not stage", "outside prod"):
        assert part in text
