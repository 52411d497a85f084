"""Stateful property test: random sequences of RFC actions against a real CMS.

Whatever people and the deployment flow do, in any order (submit, approve in any role,
reject, cancel, close, force any status), the gate never allows a deployment unless the
RFC's change model is satisfied, and every gate decision is an audit event.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from sqlalchemy import func, select

from orchestrator.change import gate, lifecycle, records, rfcs
from orchestrator.change.authorize import AUTHORIZING
from orchestrator.change.lifecycle import STATUSES
from orchestrator.change.models import RfcRequest
from orchestrator.cms import db
from orchestrator.cms.models import AuditEvent
from orchestrator.errors import AuthorizationRefused
from tests.change.test_authorize import approvals_meet_model

T0 = datetime(2030, 6, 1, 9, 0, tzinfo=UTC)
WHEN = {
    "prod": datetime(2030, 6, 4, 21, 0, tzinfo=UTC),  # inside prod's Tue 22-02 Berlin
    "stage": datetime(2030, 6, 5, 12, 0, tzinfo=UTC),  # inside stage's Mon-Fri 08-18
}
USERS = st.sampled_from(["alice", "bob", "carol", "dave", "erin", "mallory"])
ROLES = st.sampled_from([None, "cab", "ecab", "change-manager", "peer"])


def test_no_sequence_of_actions_authorizes_a_deployment_the_model_does_not(
    ferry_home, models, calendar
):
    class RfcActions(RuleBasedStateMachine):
        rid: int
        env: str

        def _do(self, action) -> None:
            try:
                with db.session_scope() as s:
                    action(s)
            except AuthorizationRefused:
                pass  # refused actions change nothing but their audit record

        @initialize(
            model=st.sampled_from(["standard", "normal", "emergency"]),
            env=st.sampled_from(["prod", "stage"]),
            risk=st.sampled_from([None, "low", "medium", "high"]),
            hosts=st.sampled_from([[], ["web-*"]]),
        )
        def raise_rfc(self, model, env, risk, hosts):
            self.env = env
            fields = {
                "release": "web@1.0",
                "environment": env,
                "model": model,
                "hosts": hosts,
                "risk": risk,
                "reason": "judged" if risk else None,
                "template": "web-staging" if model == "standard" else None,
            }
            req = RfcRequest.model_validate(fields)
            try:
                with db.session_scope() as s:
                    rfc, _ = rfcs.create(
                        s, req, actor="alice", now=T0, models=models, calendar=calendar
                    )
                    self.rid = rfc.id
            except AuthorizationRefused:  # a standard change outside its template
                with db.session_scope() as s:
                    rfc, _ = rfcs.create(
                        s,
                        req.model_copy(update={"model": "normal", "template": None}),
                        actor="alice",
                        now=T0,
                        models=models,
                        calendar=calendar,
                    )
                    self.rid = rfc.id

        @rule(actor=USERS)
        def submit(self, actor):
            self._do(
                lambda s: rfcs.submit(
                    s, self.rid, actor=actor, now=T0, models=models, calendar=calendar
                )
            )

        @rule(actor=USERS, role=ROLES)
        def approve(self, actor, role):
            self._do(
                lambda s: rfcs.approve(
                    s, self.rid, actor=actor, role=role, comment="", now=T0, models=models
                )
            )

        @rule(actors=st.permutations(["carol", "dave", "erin"]))
        def submit_and_approve_in_own_roles(self, actors):  # steers runs to authorized RFCs
            self.submit("alice")
            for actor in actors:
                self._do(
                    lambda s, a=actor: rfcs.approve(
                        s, self.rid, actor=a, role=None, comment="", now=T0, models=models
                    )
                )

        @rule(actor=USERS, role=ROLES)
        def reject(self, actor, role):
            self._do(
                lambda s: rfcs.reject(
                    s, self.rid, actor=actor, role=role, comment="no", now=T0, models=models
                )
            )

        @rule(actor=USERS)
        def cancel(self, actor):
            self._do(lambda s: rfcs.cancel(s, self.rid, actor=actor, comment="", now=T0))

        @rule(to=st.sampled_from(STATUSES))
        def force_status(self, to):
            self._do(lambda s: lifecycle.transition(s, self.rid, to, actor="flow", models=models))

        @invariant()
        def deployment_needs_what_the_model_requires(self):
            with db.session_scope() as s:
                before = s.scalar(select(func.count(AuditEvent.id)))
                d = gate.check(
                    s,
                    rfc_id=self.rid,
                    stage="deploy",
                    release="web@1.0",
                    environment=self.env,
                    hosts=["web-1"],
                    now=WHEN[self.env],
                    actor="flow",
                    models=models,
                    calendar=calendar,
                )
                assert s.scalar(select(func.count(AuditEvent.id))) == before + 1
                rfc = lifecycle.get_rfc(s, self.rid)
                view = records.to_view(rfc)
                assert all(a.approver != rfc.requester for a in rfc.approvals)
                decisions = [a.decision for a in rfc.approvals]
                if "rejected" in decisions:
                    assert "approved" not in decisions[decisions.index("rejected") :]
                event(f"deploy allowed: {d.allowed}")
                if d.allowed:
                    assert view.status in AUTHORIZING
                    assert approvals_meet_model(view), (view, d.reasons)

    RfcActions.TestCase.settings = settings(
        max_examples=40,
        stateful_step_count=12,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    RfcActions.TestCase().runTest()
