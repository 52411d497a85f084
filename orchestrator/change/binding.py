"""Approvals and RFC statuses bound to the audit chain: a row counts only with its event.

The `approvals` and `rfcs` tables are plain rows anyone with write access to the database
can insert or edit; the audit log is hash-chained. So the change gate believes an approval
only if the chained event that recorded it exists and says the same (`rfc.approval` or
`rfc.rejected` naming the approval's id, approver, role and decision), and an RFC's status
only if its newest status event (`rfc.<status>`, or `rfc.created` for a draft) moved it
there. Each event must verify on its own (its hash) and follow the event before it; a
whole rewritten chain is `ferry cms verify-audit --anchor`'s to catch.

`bound_view` is what the gate decides on; `unbound_rows` is what verify-audit reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from orchestrator.change import records
from orchestrator.change.authorize import RfcView
from orchestrator.cms.audit import event_hash
from orchestrator.cms.models import RFC, Approval, AuditEvent

APPROVAL_EVENTS = ("rfc.approval", "rfc.rejected")


@dataclass(frozen=True)
class Binding:
    view: RfcView  # the RFC with only its bound approvals, and its status as the chain says
    problems: list[str]  # one line per row without a matching event

    @property
    def status_bound(self) -> bool:
        return not any(p.startswith(f"RFC-{self.view.id}: status") for p in self.problems)


def _chained(session: Session, events: list[AuditEvent]) -> set[int]:
    """The ids of events whose own hash verifies and whose predecessor's hash they carry."""
    ids = {e.id - 1 for e in events}
    prev = {e.id: e.hash for e in session.scalars(select(AuditEvent).where(AuditEvent.id.in_(ids)))}
    prev[0] = "0" * 64
    return {
        e.id
        for e in events
        if event_hash(e.prev_hash, e) == e.hash and prev.get(e.id - 1) == e.prev_hash
    }


def _recorded_status(events: list[AuditEvent]) -> str | None:
    status = None
    for e in events:
        data: dict[str, Any] = e.data or {}
        if e.action == "rfc.created":
            status = "draft"
        elif "to" in data and e.action == f"rfc.{data['to']}":
            status = str(data["to"])
    return status


def _matches(a: Approval, e: AuditEvent | None) -> bool:
    if e is None:
        return False
    d = e.data or {}
    return (
        d.get("approval") == a.id
        and e.actor == a.approver
        and d.get("role") == a.role
        and d.get("decision", "rejected" if e.action == "rfc.rejected" else None) == a.decision
        # per-stage approvals: a row edited to count for another stage no longer matches
        and (d.get("stage") or None) == (a.stage or None)
    )


def bind(session: Session, rfc: RFC) -> Binding:
    events = list(
        session.scalars(
            select(AuditEvent)
            .where(AuditEvent.subject_type == "rfc", AuditEvent.subject_id == str(rfc.id))
            .order_by(AuditEvent.id)
        )
    )
    good = _chained(session, events)
    events = [e for e in events if e.id in good]
    by_approval = {(e.data or {}).get("approval"): e for e in events if e.action in APPROVAL_EVENTS}
    problems: list[str] = []
    kept = []
    view = records.to_view(rfc)
    for a, seen in zip(rfc.approvals, view.approvals, strict=True):
        if _matches(a, by_approval.get(a.id)):
            kept.append(seen)
        else:
            problems.append(
                f"RFC-{rfc.id}: approval {a.id} ({a.decision} by {a.approver} as {a.role}) has "
                "no matching audit event: not counted"
            )
    recorded = _recorded_status(events)
    if recorded != rfc.status:
        problems.append(
            f"RFC-{rfc.id}: status {rfc.status!r} has no matching audit event (the audit log "
            f"last moved it to {recorded!r})"
        )
    status = recorded or "draft"
    return Binding(replace(view, approvals=tuple(kept), status=status), problems)


def unbound_rows(session: Session) -> list[str]:
    """Every RFC status and approval row without its audit event (for verify-audit)."""
    out: list[str] = []
    for rfc in session.scalars(select(RFC).order_by(RFC.id)):
        out += bind(session, rfc).problems
    return out
