"""A release's service validation, per environment: what `ferry release show` tells (where
its package digest ran, which acceptance tests passed, where it is promotable) and the
user-acceptance sign-off (`ferry release accept`), with separation of duties as for
approvals: the requester of an RFC the package was deployed under may not sign it off.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from orchestrator.change.promotion import PILOT, EnvironmentEvidence, Lifecycle, missing
from orchestrator.cms import audit, evidence
from orchestrator.cms.models import Release
from orchestrator.errors import AuthorizationRefused, BadInput

SIGN_OFF_NAME = "user-acceptance sign-off"


def environments(session: Session, rel: Release, lifecycle: Lifecycle) -> dict[str, Any]:
    """environment → where the digest ran, its acceptance results, promotable or why not."""
    found = evidence.environment_evidence(session, rel.digest)
    names = lifecycle.environments + sorted(set(found) - set(lifecycle.environments))
    out: dict[str, Any] = {}
    for env in names:
        ev = found.get(env, EnvironmentEvidence(env))
        rule = lifecycle.rule(env)
        lacking = missing(lifecycle, env, rel.digest, found, deferred=(PILOT,))
        out[env] = {
            "deployments": [{"id": i, "status": st} for i, st in ev.deployments],
            "succeeded": ev.succeeded,
            "acceptance": dict(sorted(ev.acceptance.items())),
            "failed_acceptance": list(ev.failed_acceptance),
            "sign_offs": list(ev.sign_offs),
            "pilot_passed": ev.pilot_passed,
            "rule": rule.model_dump(mode="json") if rule else None,
            "promotable": not lacking,
            "needs_pilot_wave": bool(rule and PILOT in rule.after and not ev.pilot_passed),
            "missing": lacking,
        }
    return out


def sign_off_refusals(actor: str, environment: str, ev: EnvironmentEvidence | None) -> list[str]:
    """Why `actor` may not sign user acceptance off in `environment` (pure)."""
    if ev is None or not ev.succeeded:
        return [
            f"the package has not succeeded in {environment}: user acceptance is signed off "
            "for what ran there"
        ]
    if actor in ev.requesters:
        return [
            f"{actor} requested the change that deployed it to {environment} and cannot sign "
            "its user acceptance off (separation of duties: ask another person)"
        ]
    return []


def sign_off(
    session: Session,
    rel: Release,
    environment: str,
    *,
    actor: str,
    comment: str,
    now: datetime,
) -> dict[str, Any]:
    """Record a user-acceptance sign-off as evidence; a refusal is recorded, then raised."""
    if not comment.strip():
        raise BadInput("--comment: say what was accepted (it is kept as evidence)")
    found = evidence.environment_evidence(session, rel.digest)
    ev = found.get(environment)
    reasons = sign_off_refusals(actor, environment, ev)
    data = {"environment": environment, "digest": rel.digest, "at": now.isoformat()}
    if reasons:
        audit.append(
            session,
            actor=actor,
            action="release.accept.refused",
            subject_type="release",
            subject_id=rel.ref,
            data={**data, "reasons": reasons},
        )
        session.commit()  # the refusal is on record whatever the caller does next
        raise AuthorizationRefused(
            f"{rel.ref}: user-acceptance sign-off in {environment} refused: " + "; ".join(reasons),
            reasons,
        )
    assert ev is not None
    if actor in ev.sign_offs:
        return {**data, "release": rel.ref, "actor": actor, "changed": False}
    deployment = max(i for i, st in ev.deployments if st == "succeeded")
    evidence.record(
        session,
        [
            {
                "release": rel.ref,
                "digest": rel.digest,
                "environment": environment,
                "deployment_id": deployment,
                "kind": evidence.SIGN_OFF,
                "name": SIGN_OFF_NAME,
                "type": "user-acceptance",
                "passed": True,
                "actor": actor,
                "comment": comment,
            }
        ],
    )
    audit.append(
        session,
        actor=actor,
        action="release.accepted",
        subject_type="release",
        subject_id=rel.ref,
        data={**data, "deployment": deployment, "comment": comment},
    )
    return {**data, "release": rel.ref, "actor": actor, "deployment": deployment, "changed": True}
