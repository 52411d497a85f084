"""RFC records as the rest of Ferry sees them: snapshots for `authorize`, dicts for output,
and the risk model's inputs gathered from the CMS (hosts, package size, recent failures).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dml.ref import ReleaseRef
from orchestrator.change.authorize import ApprovalView, RfcView, missing_authorization
from orchestrator.change.calendar import Calendar
from orchestrator.change.models import ChangeModels
from orchestrator.change.risk import RiskAssessment, RiskInputs, assess
from orchestrator.cms.models import RFC, Deployment, Host, Package, Release

FAILED_DEPLOYMENTS = ("failed", "backed-out")


def to_view(rfc: RFC) -> RfcView:
    return RfcView(
        id=rfc.id,
        release=rfc.release,
        environment=rfc.environment,
        model=rfc.model,
        status=rfc.status,
        requester=rfc.requester,
        risk=rfc.risk,
        template=rfc.template,
        stages=tuple(rfc.stages or ("checkin", "deploy")),
        hosts=tuple(rfc.hosts or ()),
        windows=tuple((w.start, w.end) for w in rfc.windows),
        approvals=tuple(
            ApprovalView(a.approver, a.role, a.decision, a.created_at, a.stage)
            for a in rfc.approvals
        ),
        submitted_at=rfc.submitted_at,
    )


def iso(at: datetime | None) -> str | None:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else None


def to_dict(rfc: RFC, models: ChangeModels | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rfc.id,
        "ref": f"RFC-{rfc.id}",
        "title": rfc.title,
        "release": rfc.release,
        "environment": rfc.environment,
        "model": rfc.model,
        "template": rfc.template,
        "status": rfc.status,
        "stages": list(rfc.stages or []),
        "hosts": list(rfc.hosts or []),
        "windows": [{"start": iso(w.start), "end": iso(w.end)} for w in rfc.windows],
        "risk": {
            "level": rfc.risk,
            "score": rfc.risk_score,
            "overridden": rfc.risk_reason is not None,
            "override_reason": rfc.risk_reason,
            "factors": list(rfc.risk_factors or []),
        },
        "backout_plan": rfc.backout_plan,
        "requester": rfc.requester,
        "ci": rfc.ci,
        "approvals": [
            {
                "approver": a.approver,
                "role": a.role,
                "decision": a.decision,
                "stage": a.stage,
                "comment": a.comment,
                "at": iso(a.created_at),
            }
            for a in rfc.approvals
        ],
        "needs_review": rfc.needs_review,
        "review_due": iso(rfc.review_due),
        "submitted_at": iso(rfc.submitted_at),
        "authorized_at": iso(rfc.authorized_at),
        "created_at": iso(rfc.created_at),
    }
    if models is not None:
        out["missing"] = missing_authorization(to_view(rfc), models)
    return out


def assess_risk(
    session: Session,
    *,
    release: str,
    environment: str,
    model: str,
    hosts: list[str],
    now: datetime,
    calendar: Calendar,
    models: ChangeModels,
    release_size: int | None = None,
) -> RiskAssessment:
    """Gather the risk model's inputs from the calendar and the CMS, then score them."""
    known = session.scalars(select(Host.name).where(Host.environment == environment)).all()
    if not hosts:
        count: int | None = len(known) or None
    elif known:
        count = sum(1 for h in known if any(fnmatchcase(h, p) for p in hosts))
    else:
        has_pattern = any(ch in p for p in hosts for ch in "*?[")
        count = None if has_pattern else len(hosts)
    if release_size is None:
        ref = ReleaseRef.parse(release)
        release_size = session.scalar(
            select(Package.size)
            .join(Release, Package.release_id == Release.id)
            .where(Release.name == ref.name, Release.version == ref.version)
        )
    failures = session.scalar(
        select(func.count(Deployment.id)).where(
            Deployment.environment == environment,
            Deployment.status.in_(FAILED_DEPLOYMENTS),
            Deployment.started_at >= now - timedelta(days=30),
        )
    )
    inputs = RiskInputs(
        environment=environment,
        criticality=calendar.env(environment).criticality,
        model=model,
        host_count=count,
        release_size=release_size,
        recent_failures=int(failures or 0),
    )
    return assess(inputs, models.risk)


def apply_risk(rfc: RFC, risk: RiskAssessment) -> None:
    rfc.risk, rfc.risk_score, rfc.risk_reason = risk.level, risk.score, risk.override_reason
    rfc.risk_factors = [f.to_dict() for f in risk.factors]
