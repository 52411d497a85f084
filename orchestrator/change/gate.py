"""The change gate: the one place every stage asks "may this change happen now?".

Callers (DML check-in, deployment start, every wave boundary) use `require()`, which raises
AuthorizationRefused with every reason, or `check()`, which returns the Decision. Both write
an audit event with the decision, so the reason for every yes and no is on record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from orchestrator.cms import audit
from orchestrator.cms.models import RFC
from orchestrator.errors import AuthorizationRefused

Stage = Literal["checkin", "deploy"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reasons": list(self.reasons)}


def parse_rfc_id(value: str | int) -> int:
    text = str(value).strip()
    if text.upper().startswith("RFC-"):
        text = text[4:]
    if not text.isdigit():
        from orchestrator.errors import BadInput

        raise BadInput(f"--rfc: {value!r} is not an RFC id (a number, e.g. 12 or RFC-12)")
    return int(text)


def _authorize(
    rfc: RFC | None, stage: Stage, release: str, environment: str | None, now: datetime
) -> Decision:
    """Simplest real rule until the full change-authorization logic lands."""
    if rfc is None:
        return Decision(False, ["no such RFC"])
    reasons: list[str] = []
    if rfc.status not in ("authorized", "scheduled", "implementing"):
        reasons.append(f"RFC-{rfc.id} is {rfc.status}, not authorized")
    if rfc.release != release:
        reasons.append(f"RFC-{rfc.id} is for {rfc.release}, not {release}")
    if stage not in (rfc.stages or ["checkin", "deploy"]):
        reasons.append(f"RFC-{rfc.id} does not cover the {stage} stage")
    if stage == "deploy" and environment and rfc.environment != environment:
        reasons.append(f"RFC-{rfc.id} is for environment {rfc.environment}, not {environment}")
    return Decision(not reasons, reasons or [f"RFC-{rfc.id} authorizes {stage} of {release}"])


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
) -> Decision:
    rid = parse_rfc_id(rfc_id)
    rfc = session.get(RFC, rid)
    decision = _authorize(rfc, stage, release, environment, now)
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
            "hosts": hosts or [],
            **decision.to_dict(),
        },
    )
    return decision


def require(session: Session, **kwargs: Any) -> Decision:
    """Like check(), but a refusal raises AuthorizationRefused (exit code 3)."""
    decision = check(session, **kwargs)
    if not decision.allowed:
        raise AuthorizationRefused(
            f"RFC-{parse_rfc_id(kwargs['rfc_id'])} does not authorize {kwargs['stage']} of "
            f"{kwargs['release']}: " + "; ".join(decision.reasons),
            reasons=decision.reasons,
        )
    return decision
