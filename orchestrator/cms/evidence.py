"""Release evidence in the CMS: the one writer of `release_evidence` rows, and its readers.

A deployment's acceptance tests (orchestrator/acceptance.py), its pilot wave's verdict and a
person's user-acceptance sign-off (`ferry release accept`) are written here, each row on
the package digest and the environment. Readers turn the rows, with the deployments of
the same digest, into `promotion.EnvironmentEvidence` for the change gate and
`ferry release show`, and into plain facts for the service validation KPIs
(orchestrator/change/validation.py). Deployment rows are only read here (their one writer
is orchestrator/cms/deployments.py).
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from orchestrator.change.promotion import EnvironmentEvidence
from orchestrator.change.validation import AcceptanceFact, DeploymentFact
from orchestrator.cms.models import RFC, Deployment, ReleaseEvidence, utcnow

ACCEPTANCE, PILOT, SIGN_OFF = "acceptance", "pilot", "sign-off"


def record(session: Session, rows: list[dict[str, Any]]) -> None:
    """Append evidence rows (each: release, digest, environment, kind, name, passed, actor,
    and optionally deployment_id, scope, type, host, output, duration_ms, comment)."""
    if not rows:
        return
    at = utcnow()
    full = [
        {
            "deployment_id": None,
            "scope": "deployment",
            "type": None,
            "host": None,
            "output": "",
            "duration_ms": 0,
            "comment": "",
            "recorded_at": at,
            **r,
        }
        for r in rows
    ]
    session.execute(insert(ReleaseEvidence), full)


def rows_for(session: Session, digest: str) -> list[dict[str, Any]]:
    q = select(ReleaseEvidence).where(ReleaseEvidence.digest == digest).order_by(ReleaseEvidence.id)
    return [_row(r) for r in session.scalars(q)]


def _row(r: ReleaseEvidence) -> dict[str, Any]:
    return {
        "id": r.id,
        "release": r.release,
        "environment": r.environment,
        "deployment_id": r.deployment_id,
        "kind": r.kind,
        "scope": r.scope,
        "name": r.name,
        "type": r.type,
        "host": r.host,
        "passed": r.passed,
        "output": r.output,
        "duration_ms": r.duration_ms,
        "actor": r.actor,
        "comment": r.comment,
        "recorded_at": r.recorded_at,
    }


def environment_evidence(session: Session, digest: str) -> dict[str, EnvironmentEvidence]:
    """environment → what this package digest has shown there."""
    deps = list(
        session.scalars(
            select(Deployment)
            .where(Deployment.package_digest == digest, Deployment.strategy != "backout")
            .order_by(Deployment.id)
        )
    )
    rows = rows_for(session, digest)
    rfc_ids = {d.rfc_id for d in deps if d.rfc_id is not None}
    requesters = {
        r.id: r.requester for r in session.scalars(select(RFC).where(RFC.id.in_(rfc_ids)))
    }
    by_dep: dict[int, dict[str, bool]] = defaultdict(dict)
    for r in rows:
        if r["kind"] == ACCEPTANCE and r["scope"] == "deployment" and r["deployment_id"]:
            tests = by_dep[r["deployment_id"]]
            tests[r["name"]] = tests.get(r["name"], True) and r["passed"]
    envs = sorted({d.environment for d in deps} | {r["environment"] for r in rows})
    out: dict[str, EnvironmentEvidence] = {}
    for env in envs:
        here = [d for d in deps if d.environment == env]
        mine = [r for r in rows if r["environment"] == env]
        succeeded_with_tests = [d.id for d in here if d.status == "succeeded" and by_dep.get(d.id)]
        acceptance = dict(by_dep[succeeded_with_tests[-1]]) if succeeded_with_tests else {}
        failed = sorted({r["name"] for r in mine if r["kind"] == ACCEPTANCE and not r["passed"]})
        out[env] = EnvironmentEvidence(
            environment=env,
            deployments=tuple((d.id, d.status) for d in here),
            acceptance=acceptance,
            failed_acceptance=tuple(failed),
            sign_offs=tuple(r["actor"] for r in mine if r["kind"] == SIGN_OFF and r["passed"]),
            pilot_passed=any(r["kind"] == PILOT and r["passed"] for r in mine),
            requesters=tuple(
                sorted({requesters[d.rfc_id] for d in here if d.rfc_id in requesters})
            ),
        )
    return out


def facts(
    session: Session, since: datetime | None = None
) -> tuple[list[DeploymentFact], list[AcceptanceFact]]:
    """Every deployment and acceptance result (since a time), as the KPIs take them."""
    dq = select(Deployment).where(Deployment.strategy != "backout").order_by(Deployment.id)
    eq = select(ReleaseEvidence).where(ReleaseEvidence.kind == ACCEPTANCE)
    if since is not None:
        dq = dq.where(Deployment.started_at >= since)
        eq = eq.where(ReleaseEvidence.recorded_at >= since)
    deployments = [
        DeploymentFact(
            d.id,
            d.release,
            d.package_digest,
            d.environment,
            d.status,  # a manual backout moves a succeeded one to backed-out
            d.finished_at or d.started_at,
        )
        for d in session.scalars(dq)
    ]
    results = [
        AcceptanceFact(
            r.deployment_id,
            r.release,
            r.digest,
            r.environment,
            r.name,
            r.type or "functional",
            r.passed,
            r.recorded_at,
        )  # fmt: skip
        for r in session.scalars(eq.order_by(ReleaseEvidence.id))
    ]
    return deployments, results
