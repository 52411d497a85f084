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

from datetime import datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from orchestrator.change import binding, config
from orchestrator.change.authorize import Decision, authorize
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
) -> Decision:
    """The decision for this stage now, recorded as an audit event on the RFC."""
    rid = parse_rfc_id(rfc_id)
    if stage not in STAGES:
        raise BadInput(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
    if now.tzinfo is None:
        raise BadInput("now: the gate needs an aware (UTC) time")
    rfc = session.get(RFC, rid)
    if rfc is None:
        decision = Decision(False, [f"RFC-{rid} does not exist"])
    else:
        bound = binding.bind(session, rfc)  # rows without their audit event do not count
        decision = authorize(
            bound.view,
            stage,
            environment,
            list(hosts) if hosts is not None else None,
            release,
            now,
            models or config.load_change_models(),
            calendar or config.load_calendar(),
        )
        if bound.problems and not decision.allowed:
            decision = Decision(False, [*decision.reasons, *bound.problems])
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
        },
    )
    return decision


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
