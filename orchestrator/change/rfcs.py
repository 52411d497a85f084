"""What people do with RFCs: raise, submit, approve, reject, cancel, close, show, list.

Each action checks its rules, changes the record through `lifecycle.transition` and writes
an audit event; a refusal is recorded too (and committed) before it is raised, so the reason
for every yes and no is on record. The CLI is a thin layer over these functions.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.change import binding, lifecycle, records
from orchestrator.change.authorize import (
    approval_rule,
    approves_each_stage,
    missing_authorization,
)
from orchestrator.change.calendar import Booking, Calendar, conflicts
from orchestrator.change.models import ROLES, ChangeModels, RfcRequest
from orchestrator.change.risk import override
from orchestrator.cms import audit
from orchestrator.cms.models import RFC, Approval, ChangeWindow
from orchestrator.errors import BadInput

ACTIVE = ("submitted", "assessed", "authorized", "scheduled", "implementing")


def create(
    session: Session,
    req: RfcRequest,
    *,
    actor: str,
    now: datetime,
    models: ChangeModels,
    calendar: Calendar,
) -> tuple[RFC, list[str]]:
    """Raise an RFC (draft). A standard change that fits its template is authorized at once."""
    if req.model == "standard" and models.models.standard.template(req.template) is None:
        names = ", ".join(t.name for t in models.models.standard.templates) or "none defined"
        raise BadInput(f"--template: no standard template {req.template!r} (templates: {names})")
    risk = records.assess_risk(
        session,
        release=req.release,
        environment=req.environment,
        model=req.model,
        hosts=req.hosts,
        now=now,
        calendar=calendar,
        models=models,
        release_size=req.release_size,
    )
    if req.risk is not None:
        risk = override(risk, req.risk, req.reason or "")
    if req.model == "standard":
        template = models.models.standard.template(req.template)
        assert template is not None
        why = template.mismatches(req.release_name, req.environment, risk.level, req.stages)
        if why:
            lifecycle.refuse(
                session,
                f"new:{req.release}",
                actor=actor,
                action="rfc.new",
                reasons=[f"not a standard change under template {template.name}: {w}" for w in why],
                data={"request": req.model_dump(mode="json"), "risk": risk.to_dict()},
            )
    rfc = RFC(
        title=req.title or f"{req.release} to {req.environment}",
        release=req.release,
        environment=req.environment,
        model=req.model,
        template=req.template,
        status="draft",
        stages=list(req.stages),
        hosts=list(req.hosts),
        backout_plan=req.backout_plan,
        requester=actor,
        created_at=now,
        windows=[ChangeWindow(start=a, end=b) for a, b in req.windows],
    )
    records.apply_risk(rfc, risk)
    session.add(rfc)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action="rfc.created",
        subject_type="rfc",
        subject_id=rfc.id,
        data={"request": req.model_dump(mode="json"), "risk": risk.to_dict()},
    )
    warnings: list[str] = []
    if req.model == "standard":
        warnings = submit(session, rfc.id, actor=actor, now=now, models=models, calendar=calendar)
    return rfc, warnings


def submit(
    session: Session,
    rfc_id: int,
    *,
    actor: str,
    now: datetime,
    models: ChangeModels,
    calendar: Calendar,
) -> list[str]:
    """draft → submitted → assessed (→ authorized for a standard change); returns warnings."""
    rfc = lifecycle.get_rfc(session, rfc_id)
    if rfc.status != "draft":
        if rfc.status in ("submitted", "assessed"):
            return [f"RFC-{rfc_id} was already submitted"]
        lifecycle.refuse(
            session,
            rfc_id,
            actor=actor,
            action="rfc.submit",
            reasons=[f"RFC-{rfc_id} is {rfc.status}; only a draft is submitted"],
        )
    problems, warnings = _check_windows(rfc, now, models, calendar)
    if problems:
        lifecycle.refuse(session, rfc_id, actor=actor, action="rfc.submit", reasons=problems)
    if rfc.risk_reason is None:  # re-score: failures may have happened since it was raised
        records.apply_risk(
            rfc,
            records.assess_risk(
                session,
                release=rfc.release,
                environment=rfc.environment,
                model=rfc.model,
                hosts=list(rfc.hosts or []),
                now=now,
                calendar=calendar,
                models=models,
            ),
        )
    lifecycle.transition(session, rfc_id, "submitted", actor=actor, models=models, now=now)
    clash = _conflicts(session, rfc)
    if clash:
        text = f"RFC-{rfc_id} may change the same hosts in the same windows as " + ", ".join(
            f"RFC-{i}" for i in clash
        )
        warnings.append(text)
        for other in [rfc_id, *clash]:
            audit.append(
                session,
                actor=actor,
                action="rfc.conflict",
                subject_type="rfc",
                subject_id=other,
                data={"rfcs": sorted([rfc_id, *clash]), "warning": text},
            )
    assessment = {
        "risk": rfc.risk,
        "score": rfc.risk_score,
        "factors": rfc.risk_factors,
        "warnings": warnings,
    }
    lifecycle.transition(
        session, rfc_id, "assessed", actor=actor, data=assessment, models=models, now=now
    )
    if rfc.model == "standard":
        _authorize_if_complete(
            session,
            rfc,
            actor=actor,
            now=now,
            models=models,
            note=f"pre-authorized by standard template {rfc.template}",
        )
    else:
        rule = approval_rule(records.to_view(rfc), models)
        if rule is not None:
            warnings.append(f"RFC-{rfc_id} needs {rule.describe()}")
    return warnings


def _check_windows(
    rfc: RFC, now: datetime, models: ChangeModels, calendar: Calendar
) -> tuple[list[str], list[str]]:
    """(problems, warnings) about the RFC's own windows against the environment calendar."""
    problems: list[str] = []
    warnings: list[str] = []
    lead = 0.0
    if rfc.model == "normal":
        lead = models.models.normal.lead_time_hours.get(rfc.risk, 0.0)  # type: ignore[call-overload]
    for w in rfc.windows:
        span = f"{records.iso(w.start)}/{records.iso(w.end)}"
        if w.end <= now:
            problems.append(f"window {span} has already ended")
            continue
        if rfc.model == "emergency":
            continue
        if not calendar.fits(rfc.environment, w.start, w.end):
            specs = "; ".join(x.spec for x in calendar.env(rfc.environment).windows)
            problems.append(
                f"window {span} is not inside a change window of {rfc.environment} ({specs})"
            )
        for b in calendar.blackouts_overlapping(rfc.environment, w.start, w.end):
            warnings.append(f"window {span} overlaps blackout {b.name!r}; it is unusable then")
        if lead and w.start < now + timedelta(hours=lead):
            warnings.append(
                f"window {span} opens within the {lead:g}h lead time of "
                f"{rfc.risk} risk; it will not be usable"
            )
    return problems, warnings


def _conflicts(session: Session, rfc: RFC) -> list[int]:
    others = session.scalars(
        select(RFC).where(RFC.environment == rfc.environment, RFC.status.in_(ACTIVE))
    ).all()
    return conflicts(_booking(rfc), [_booking(o) for o in others])


def _booking(rfc: RFC) -> Booking:
    windows = tuple((w.start, w.end) for w in rfc.windows)
    return Booking(rfc.id, rfc.environment, tuple(rfc.hosts or ()), windows)


def _authorize_if_complete(
    session: Session, rfc: RFC, *, actor: str, now: datetime, models: ChangeModels, note: str
) -> None:
    if rfc.status != "assessed" or missing_authorization(binding.bind(session, rfc).view, models):
        return
    lifecycle.transition(
        session, rfc.id, "authorized", actor=actor, note=note, models=models, now=now
    )
    if rfc.windows:
        lifecycle.transition(
            session,
            rfc.id,
            "scheduled",
            actor=actor,
            models=models,
            now=now,
            data={"windows": [[records.iso(w.start), records.iso(w.end)] for w in rfc.windows]},
        )


def _decider_role(
    session: Session,
    rfc: RFC,
    *,
    actor: str,
    role: str | None,
    models: ChangeModels,
    action: str,
    later_stage: bool = False,
) -> str:
    """The role the actor decides in; refuse what separation of duties or the roles forbid.
    `later_stage`: an approval of a later stage, taken once the RFC is authorized."""
    reasons: list[str] = []
    if actor == rfc.requester:
        reasons.append(
            f"{actor} raised RFC-{rfc.id} and cannot {action} it (separation of "
            "duties: ask another approver)"
        )
    if rfc.model == "standard":
        reasons.append(f"RFC-{rfc.id} is a standard change, pre-authorized by its template")
    held = models.roles.get(actor, [])
    if role is None:
        order = ["ecab", *ROLES] if rfc.model == "emergency" else [r for r in ROLES if r != "ecab"]
        role = next((r for r in order if r in held), None)
        if role is None:
            reasons.append(f"{actor} holds no approver role (roles: in change_models.yaml)")
    elif role not in held:
        reasons.append(
            f"{actor} does not hold the {role} role (holds: "
            f"{', '.join(held) or 'none'}; roles: in change_models.yaml)"
        )
    if rfc.status == "rejected":
        reasons.append(f"RFC-{rfc.id} was rejected; nothing more can be decided on it")
    elif rfc.status == "draft":
        reasons.append(f"RFC-{rfc.id} is a draft; submit it first")
    elif later_stage and rfc.status in ("authorized", "scheduled"):
        pass  # per-stage approvals: the deploy stage is approved after check-in's
    elif rfc.status not in ("submitted", "assessed"):
        reasons.append(f"RFC-{rfc.id} is {rfc.status}; approvals are taken while it is assessed")
    if reasons:
        lifecycle.refuse(
            session,
            rfc.id,
            actor=actor,
            action=f"rfc.{action}",
            reasons=reasons,
            data={"role": role},
        )
    assert role is not None
    return role


def approve(
    session: Session,
    rfc_id: int,
    *,
    actor: str,
    role: str | None,
    comment: str,
    now: datetime,
    models: ChangeModels,
    stage: str | None = None,
) -> list[str]:
    """Record an approval; once the model's approvals are complete, the RFC is authorized.
    Under a change model that approves each stage, the approval names its `stage` and the
    RFC is authorized once its first stage is approved (the gate checks each stage's own).

    Returns notes (a repeated approval by the same person is a no-op, not a second vote)."""
    rfc = lifecycle.get_rfc(session, rfc_id)
    per_stage = approves_each_stage(records.to_view(rfc), models)
    if per_stage:
        stages = list(rfc.stages or ())
        if stage is None or stage not in stages:
            raise BadInput(
                f"--stage: RFC-{rfc_id}'s {rfc.model} change model approves each stage "
                f"separately: name one of {', '.join(stages)} (e.g. --stage {stages[0]})"
            )
    elif stage is not None:
        raise BadInput(
            f"--stage: RFC-{rfc_id}'s {rfc.model} change model takes one approval for every "
            "stage; approve without --stage"
        )
    role = _decider_role(
        session, rfc, actor=actor, role=role, models=models, action="approve",
        later_stage=per_stage,
    )  # fmt: skip
    if any(
        a.approver == actor and a.decision == "approved" and a.stage == stage for a in rfc.approvals
    ):
        what = f" for the {stage} stage" if stage else ""
        return [f"{actor} has already approved RFC-{rfc_id}{what}"]
    rfc.approvals.append(
        Approval(
            approver=actor, role=role, decision="approved", comment=comment, created_at=now,
            stage=stage,
        )
    )  # fmt: skip
    session.flush()
    audit.append(
        session,
        actor=actor,
        action="rfc.approval",
        subject_type="rfc",
        subject_id=rfc_id,
        # the approval's id binds this event to its row: the gate counts only bound rows
        data={
            "approval": rfc.approvals[-1].id,
            "role": role,
            "decision": "approved",
            "comment": comment,
            **({"stage": stage} if stage else {}),
        },
    )
    _authorize_if_complete(
        session, rfc, actor=actor, now=now, models=models, note="approvals complete"
    )
    return []


def reject(
    session: Session,
    rfc_id: int,
    *,
    actor: str,
    role: str | None,
    comment: str,
    now: datetime,
    models: ChangeModels,
) -> None:
    rfc = lifecycle.get_rfc(session, rfc_id)
    role = _decider_role(session, rfc, actor=actor, role=role, models=models, action="reject")
    rfc.approvals.append(
        Approval(approver=actor, role=role, decision="rejected", comment=comment, created_at=now)
    )
    session.flush()
    lifecycle.transition(
        session,
        rfc_id,
        "rejected",
        actor=actor,
        note=comment,
        data={"role": role, "approval": rfc.approvals[-1].id, "decision": "rejected"},
        models=models,
        now=now,
    )


def cancel(session: Session, rfc_id: int, *, actor: str, comment: str, now: datetime) -> None:
    lifecycle.transition(session, rfc_id, "cancelled", actor=actor, note=comment, now=now)


def close(
    session: Session,
    rfc_id: int,
    *,
    actor: str,
    comment: str,
    now: datetime,
    models: ChangeModels | None = None,
) -> dict[str, Any] | None:
    """Close the RFC; a change that was implemented (or backed out, or failed) gets its
    post-implementation review on record: the comment and the change's own figures
    (deployments, hosts, waves, failures, backout, early life support). Returns the review.

    A normal change whose model sets `review_before_close` needs the review's outcome
    (--comment) to close, as an emergency change always does."""
    from orchestrator.insight.records import deployments_of_rfc
    from orchestrator.insight.review import change_review

    rfc = lifecycle.get_rfc(session, rfc_id)
    required = (
        rfc.model == "normal"
        and models is not None
        and models.models.normal.review_before_close
        and rfc.status in lifecycle.FINISHED
    )
    if required and not comment.strip():
        lifecycle.refuse(
            session,
            rfc_id,
            actor=actor,
            action="rfc.close",
            reasons=[
                f"RFC-{rfc_id} is a normal change and its change model requires a "
                "post-implementation review before close: close it with --comment giving "
                "the review's outcome"
            ],
        )
    review = None
    if rfc.status in lifecycle.FINISHED or rfc.needs_review:
        review = {
            "by": actor,
            "at": records.iso(now),
            "comment": comment,
            "figures": change_review(rfc_id, deployments_of_rfc(session, rfc_id)),
        }
    data = {"review": review} if review else None
    lifecycle.transition(session, rfc_id, "closed", actor=actor, note=comment, data=data, now=now)
    return review


def show(session: Session, rfc_id: int, models: ChangeModels) -> dict[str, Any]:
    rfc = lifecycle.get_rfc(session, rfc_id)
    return {**records.to_dict(rfc, models), "history": audit.history(session, "rfc", rfc_id)}


def list_rfcs(
    session: Session,
    *,
    status: str | None = None,
    needs_review: bool = False,
    environment: str | None = None,
) -> list[dict[str, Any]]:
    query = select(RFC).order_by(RFC.id)
    if status:
        query = query.where(RFC.status == status)
    if needs_review:
        query = query.where(RFC.needs_review.is_(True))
    if environment:
        query = query.where(RFC.environment == environment)
    return [records.to_dict(r) for r in session.scalars(query)]
