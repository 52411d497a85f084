"""The change gate: the one place every stage asks "may this change happen now?".

Callers (DML check-in, deployment start, every wave boundary) use `require()`, which raises
AuthorizationRefused with every reason, or `check()`, which returns the Decision. Both write
an audit event with the decision, so the reason for every yes and no is on record. The
decision itself is `authorize.authorize(...)`, pure; this module only loads what it needs.

A refusal from `require()` commits the caller's session before raising: otherwise the
caller's rollback would erase the audit event of the refusal. Callers hold nothing in that
session they would not want recorded next to a refusal.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy.orm import Session

from orchestrator.change import binding, config, promotion
from orchestrator.change.authorize import Decision, authorize, missing_authorization
from orchestrator.change.calendar import Calendar
from orchestrator.change.models import ChangeModels
from orchestrator.cms import audit
from orchestrator.cms.models import RFC
from orchestrator.errors import AuthorizationRefused, BadInput

Stage = Literal["plan", "checkin", "deploy"]
STAGES: tuple[str, ...] = ("plan", "checkin", "deploy")

__all__ = ["Decision", "Stage", "check", "parse_rfc_id", "require"]


def parse_rfc_id(value: str | int) -> int:
    """`RFC-12`, `12` or 12 → 12."""
    text = str(value).strip()
    if text.upper().startswith("RFC-"):
        text = text[4:]
    if not text.isdigit():
        raise BadInput(f"--rfc: {value!r} is not an RFC id (a number, e.g. 12 or RFC-12)")
    return int(text)


def check(
    session: Session,
    *,
    rfc_id: int | str,
    stage: Stage,
    release: str,
    environment: str | None = None,
    hosts: list[str] | None = None,
    now: datetime,
    actor: str,
    models: ChangeModels | None = None,
    calendar: Calendar | None = None,
    digest: str | None = None,
    deferred: tuple[str, ...] = (),
    lifecycle: promotion.Lifecycle | None = None,
) -> Decision:
    """The decision for this stage now, recorded as an audit event on the RFC.

    Check-in and deployment also meet the release lifecycle's promotion rule for the
    environment (orchestrator/change/promotion.py): `digest` is the package's (default:
    the release's registered digest), `deferred` what this deployment meets later (a
    pilot wave)."""
    rid = parse_rfc_id(rfc_id)
    if stage not in STAGES:
        raise BadInput(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    if now.tzinfo is None:
        raise BadInput("now: the gate needs an aware (UTC) time")
    rfc = session.get(RFC, rid)
    bypassed: list[str] = []
    if rfc is None:
        decision = Decision(False, [f"RFC-{rid} does not exist"])
    else:
        models = models or config.load_change_models()
        bound = binding.bind(session, rfc)  # rows without their audit event do not count
        view = bound.view
        decision = authorize(
            view,
            stage,
            environment,
            list(hosts) if hosts is not None else None,
            release,
            now,
            models,
            calendar or config.load_calendar(),
        )
        if bound.problems and not decision.allowed:
            decision = Decision(False, [*decision.reasons, *bound.problems])
        if stage in ("checkin", "deploy"):
            if stage == "checkin":  # a pilot wave comes after the check-in, by its nature
                deferred = (*deferred, promotion.PILOT)
            unmet = _promotion(
                session, release, environment or rfc.environment, digest, deferred, lifecycle
            )
            if unmet and rfc.model == "emergency" and not missing_authorization(view, models):
                # the ECAB may ship a fix past the lifecycle; the review must look at it
                bypassed = unmet
                rfc.needs_review = True
                days = models.models.emergency.review_within_days
                rfc.review_due = rfc.review_due or now + timedelta(days=days)
                decision = Decision(
                    decision.allowed,
                    decision.reasons
                    + (
                        [
                            "emergency change authorized by the ECAB: promotion rule bypassed, "
                            "flagged for review (" + "; ".join(unmet) + ")"
                        ]
                        if decision.allowed
                        else []
                    ),
                )
            elif unmet:
                refused = decision.reasons if not decision.allowed else []
                decision = Decision(False, refused + unmet)
    audit.append(
        session,
        actor=actor,
        action="authorize." + ("allowed" if decision.allowed else "refused"),
        subject_type="rfc",
        subject_id=rid,
        data={
            "stage": stage,
            "release": release,
            "environment": environment,
            "hosts": list(hosts or []),
            "at": now.isoformat(),
            **decision.to_dict(),
            **({"promotion_overridden": bypassed} if bypassed else {}),
        },
    )
    return decision


def _promotion(
    session: Session,
    release: str,
    environment: str,
    digest: str | None,
    deferred: tuple[str, ...],
    lifecycle: promotion.Lifecycle | None,
) -> list[str]:
    """What the package still lacks for the environment's promotion rule (empty: none)."""
    lifecycle = lifecycle or promotion.load_lifecycle()
    if lifecycle.rule(environment) is None:
        return []
    from orchestrator.cms import evidence

    if digest is None:
        from sqlalchemy import select

        from dml.ref import ReleaseRef
        from orchestrator.cms.models import Release

        ref = ReleaseRef.parse(release)
        rel = session.scalars(
            select(Release).where(Release.name == ref.name, Release.version == ref.version)
        ).one_or_none()
        if rel is None:
            return [f"promotion to {environment}: {release} is not registered"]
        digest = rel.digest
    found = evidence.environment_evidence(session, digest)
    return promotion.missing(lifecycle, environment, digest, found, deferred=deferred)


def require(session: Session, **kwargs: Any) -> Decision:
    """Like check(), but a refusal raises AuthorizationRefused (exit code 3)."""
    decision = check(session, **kwargs)
    if not decision.allowed:
        session.commit()  # the refusal's audit event must survive the caller's rollback
        raise AuthorizationRefused(
            f"RFC-{parse_rfc_id(kwargs['rfc_id'])} does not authorize {kwargs['stage']} of "
            f"{kwargs['release']}: " + "; ".join(decision.reasons),
            reasons=decision.reasons,
        )
    return decision
