"""The RFC lifecycle: which status may follow which, and the one function that moves it.

    draft → submitted → assessed → authorized | rejected
    authorized → scheduled → implementing → implemented | backed-out | failed → closed
    authorized → implementing                (no windows of its own: nothing to schedule)
    rejected → closed
    draft | submitted | assessed | authorized | scheduled → cancelled

Repeats are safe: moving an RFC to the status it already has changes nothing (a re-run
deployment reports "implemented" twice) but is still recorded. implementing → implementing
is a second deployment under the same RFC (e.g. resuming after a crash), and implemented →
implementing re-runs a finished deployment of the same release (idempotent on the hosts).
backed-out and failed never return to implementing: the failure is evidence the assessment
was wrong, so a new attempt needs a new RFC, assessed and approved again.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, NoReturn

from sqlalchemy.orm import Session

from orchestrator.change.models import ChangeModels
from orchestrator.cms import audit
from orchestrator.cms.models import RFC, utcnow
from orchestrator.errors import AuthorizationRefused, NotFound

STATUSES = (
    "draft",
    "submitted",
    "assessed",
    "authorized",
    "rejected",
    "scheduled",
    "implementing",
    "implemented",
    "backed-out",
    "failed",
    "closed",
    "cancelled",
)
OPEN = frozenset({"draft", "submitted", "assessed", "authorized", "scheduled"})
FINISHED = frozenset({"implemented", "backed-out", "failed"})
TRANSITIONS: dict[str, frozenset[str]] = {
    "draft": frozenset({"submitted"}),
    "submitted": frozenset({"assessed", "rejected"}),
    "assessed": frozenset({"authorized", "rejected"}),
    "authorized": frozenset({"scheduled", "implementing"}),
    "scheduled": frozenset({"implementing"}),
    "implementing": frozenset({"implemented", "backed-out", "failed"}),
    "implemented": frozenset({"implementing", "closed"}),
    "backed-out": frozenset({"closed"}),
    "failed": frozenset({"closed"}),
    "rejected": frozenset({"closed"}),
    "closed": frozenset(),
    "cancelled": frozenset(),
}


def can_move(current: str, to: str) -> bool:
    """Is `current → to` a step of the lifecycle (a repeat of the same status always is)?"""
    if to == current:
        return True
    if to == "cancelled":
        return current in OPEN
    return to in TRANSITIONS.get(current, frozenset())


def refuse(
    session: Session,
    rfc_id: int | str,
    *,
    actor: str,
    action: str,
    reasons: list[str],
    data: dict[str, Any] | None = None,
) -> NoReturn:
    """Record a refusal and raise it; commits first so the record outlives the caller's rollback."""
    audit.append(
        session,
        actor=actor,
        action=f"{action}.refused",
        subject_type="rfc",
        subject_id=rfc_id,
        data={**(data or {}), "reasons": reasons},
    )
    session.commit()
    raise AuthorizationRefused(f"RFC-{rfc_id}: {action} refused: " + "; ".join(reasons), reasons)


def get_rfc(session: Session, rfc_id: int) -> RFC:
    rfc = session.get(RFC, rfc_id)
    if rfc is None:
        raise NotFound(f"RFC-{rfc_id} does not exist (ferry rfc list shows the RFCs)")
    return rfc


def transition(
    session: Session,
    rfc_id: int,
    to_status: str,
    *,
    actor: str,
    note: str = "",
    data: dict[str, Any] | None = None,
    models: ChangeModels | None = None,
    now: datetime | None = None,
) -> RFC:
    """Move the RFC to `to_status` if the lifecycle allows it; record the step either way."""
    rfc = get_rfc(session, rfc_id)
    if to_status not in STATUSES:
        refuse(
            session,
            rfc_id,
            actor=actor,
            action="rfc.transition",
            reasons=[f"{to_status!r} is not an RFC status ({', '.join(STATUSES)})"],
        )
    current = rfc.status
    if not can_move(current, to_status):
        hint = (
            "; a backed-out or failed change needs a new RFC"
            if current in ("backed-out", "failed") and to_status == "implementing"
            else ""
        )
        nexts = sorted(TRANSITIONS[current] | ({"cancelled"} if current in OPEN else set()))
        refuse(
            session,
            rfc_id,
            actor=actor,
            action="rfc.transition",
            reasons=[
                f"RFC-{rfc_id} is {current}; it cannot become {to_status} "
                f"(next: {', '.join(nexts) or 'none, it is final'}){hint}"
            ],
            data={"from": current, "to": to_status},
        )
    if to_status == "closed" and rfc.needs_review and not note.strip() and current != to_status:
        refuse(
            session,
            rfc_id,
            actor=actor,
            action="rfc.close",
            reasons=[
                f"RFC-{rfc_id} is an emergency change awaiting review: close it with "
                "--comment giving the review's outcome"
            ],
        )
    at = now or utcnow()
    _side_effects(rfc, current, to_status, at, models)
    rfc.status = to_status
    audit.append(
        session,
        actor=actor,
        action=f"rfc.{to_status}",
        subject_type="rfc",
        subject_id=rfc_id,
        data={
            "from": current,
            "to": to_status,
            **({"repeat": True} if current == to_status else {}),
            **({"note": note} if note else {}),
            **(data or {}),
        },
    )
    return rfc


def _side_effects(
    rfc: RFC, current: str, to: str, at: datetime, models: ChangeModels | None
) -> None:
    """Timestamps and the emergency review flag that go with a status."""
    if current == to:
        return
    review_days = models.models.emergency.review_within_days if models else 5
    if to == "submitted" and rfc.submitted_at is None:
        rfc.submitted_at = at
    elif to == "authorized":
        rfc.authorized_at = at
        if rfc.model == "emergency":
            # flagged at authorization, so it is listed even if implementation never reports
            rfc.needs_review = True
            rfc.review_due = at + timedelta(days=review_days)
    elif to in FINISHED and rfc.model == "emergency":
        rfc.needs_review = True
        rfc.review_due = at + timedelta(days=review_days)
    elif to == "closed":
        rfc.needs_review = False
    elif to == "cancelled":
        rfc.needs_review = False  # nothing was changed, so there is nothing to review
