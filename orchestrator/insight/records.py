"""The CMS read into plain rows for the insight computations (read-only: no write, no
audit event). Each row is a dict of plain values, so every figure is computed by pure
functions that tests feed with data.

Deployments are read with their waves, their evidence's outcomes and their journal (the
host steps); RFCs with their approvals; drift audits from the audit log; each release's
source commit time from its package's provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from orchestrator.cms.db import session_scope
from orchestrator.cms.models import (
    RFC,
    AuditEvent,
    Deployment,
    EnvironmentBaseline,
    HostBaseline,
    HostStep,
    Package,
    Release,
)
from orchestrator.cms.models import Host as HostCI


@dataclass
class Records:
    """What the insight reads: every list holds plain dicts (see `gather`)."""

    rfcs: list[dict[str, Any]] = field(default_factory=list)
    deployments: list[dict[str, Any]] = field(default_factory=list)
    drift_audits: list[dict[str, Any]] = field(default_factory=list)
    commits: dict[str, datetime] = field(default_factory=dict)  # release ref → commit time
    host_baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    environment_baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    host_environments: dict[str, str | None] = field(default_factory=dict)

    @property
    def environments(self) -> list[str]:
        names = {d["environment"] for d in self.deployments}
        names |= {r["environment"] for r in self.rfcs}
        names |= {b["environment"] for b in self.host_baselines.values()}
        names |= set(self.environment_baselines)
        return sorted(n for n in names if n)


def parse_time(text: str | None) -> datetime | None:
    """An ISO time from a record's JSON (provenance, evidence); None when absent or bad."""
    if not text:
        return None
    from orchestrator.change.models import parse_instant

    try:
        return parse_instant(str(text))
    except ValueError:
        return None


def commit_time(provenance: dict[str, Any]) -> datetime | None:
    """The newest source commit time in a package's provenance (spec's repo or its units')."""
    times = [parse_time((provenance.get("source") or {}).get("committed_at"))]
    for unit in (provenance.get("units") or {}).values():
        if isinstance(unit, dict):
            times.append(parse_time((unit.get("git") or {}).get("committed_at")))
    found = [t for t in times if t is not None]
    return max(found) if found else None


def _deployment(dep: Deployment, steps: list[HostStep]) -> dict[str, Any]:
    ev = dict(dep.evidence or {})
    outcomes = {o["host"]: o for o in ev.get("outcomes", [])}
    return {
        "id": dep.id,
        "rfc_id": dep.rfc_id,
        "release": dep.release,
        "environment": dep.environment,
        "strategy": dep.strategy,
        "status": dep.status,
        "actor": dep.actor,
        "started_at": dep.started_at,
        "finished_at": dep.finished_at,
        "hosts": [h for w in (dep.rollout or {}).get("waves", []) for h in w],
        "backs_out": ev.get("backs_out"),
        "manual_backout": ev.get("manual_backout"),
        "needs_remediation": [n["host"] for n in ev.get("needs_remediation", [])],
        "failed_hosts": sorted(h for h, o in outcomes.items() if not o.get("ok")),
        "els": ev.get("els"),
        "waves": [
            {
                "index": w.index,
                "hosts": list(w.hosts),
                "status": w.status,
                "started_at": w.started_at,
                "finished_at": w.finished_at,
                "failed": list((w.verdict or {}).get("failed", [])),
                "reason": (w.verdict or {}).get("reason"),
            }
            for w in sorted(dep.waves, key=lambda w: w.index)
        ],
        "steps": [
            {
                "host": s.host,
                "wave": s.wave_index,
                "step": s.step,
                "status": s.status,
                "started_at": s.started_at,
                "finished_at": s.finished_at,
            }
            for s in steps
        ],
    }


def deployments_of_rfc(session: Any, rfc_id: int) -> list[dict[str, Any]]:
    """The deployments under one RFC (and the ones they back out), as rows."""
    deps = list(
        session.scalars(
            select(Deployment).where(Deployment.rfc_id == rfc_id).order_by(Deployment.id)
        )
    )
    ids = [d.id for d in deps]
    steps: dict[int, list[HostStep]] = {i: [] for i in ids}
    if ids:
        rows = session.scalars(
            select(HostStep).where(HostStep.deployment_id.in_(ids)).order_by(HostStep.id)
        )
        for row in rows:
            steps[row.deployment_id].append(row)
    return [_deployment(d, steps[d.id]) for d in deps]


def gather(url: str, *, since: datetime | None = None) -> Records:
    """Every record the report needs; deployments and RFCs from `since` on (later ones are
    read too: a restoration after the period still ends a failure inside it)."""
    out = Records()
    with session_scope(url) as s:
        q = select(Deployment).order_by(Deployment.id)
        if since is not None:
            # a manual backout of an earlier deployment needs that deployment too: read all
            # backouts, and every deployment a read one backs out, below
            q = q.where(Deployment.started_at >= since)
        deps = list(s.scalars(q))
        wanted = {d.id for d in deps}
        extra = {
            int(b)
            for d in deps
            if (b := (d.evidence or {}).get("backs_out")) is not None and b not in wanted
        }
        if extra:
            deps += list(s.scalars(select(Deployment).where(Deployment.id.in_(extra))))
        steps: dict[int, list[HostStep]] = {d.id: [] for d in deps}
        if deps:
            rows = s.scalars(
                select(HostStep)
                .where(HostStep.deployment_id.in_(list(steps)))
                .order_by(HostStep.id)
            )
            for row in rows:
                steps[row.deployment_id].append(row)
        out.deployments = sorted((_deployment(d, steps[d.id]) for d in deps), key=lambda d: d["id"])

        # every RFC: those awaiting action may be older than the period
        for r in s.scalars(select(RFC).order_by(RFC.id)):
            out.rfcs.append(
                {
                    "id": r.id,
                    "title": r.title,
                    "release": r.release,
                    "environment": r.environment,
                    "model": r.model,
                    "status": r.status,
                    "risk": r.risk,
                    "requester": r.requester,
                    "created_at": r.created_at,
                    "submitted_at": r.submitted_at,
                    "authorized_at": r.authorized_at,
                    "needs_review": r.needs_review,
                    "review_due": r.review_due,
                    "approvals": [
                        {
                            "approver": a.approver,
                            "role": a.role,
                            "decision": a.decision,
                            "stage": a.stage,
                            "at": a.created_at,
                        }
                        for a in r.approvals
                    ],
                }
            )
        q_drift = select(AuditEvent).where(AuditEvent.action == "remediate.drift")
        if since is not None:
            q_drift = q_drift.where(AuditEvent.at >= since)
        for ev in s.scalars(q_drift.order_by(AuditEvent.id)):
            data = dict(ev.data or {})
            out.drift_audits.append(
                {"at": ev.at, "environment": ev.subject_id, "not_ok": dict(data.get("not_ok", {}))}
            )
        for rel, pkg in s.execute(select(Release, Package).join(Package)):
            at = commit_time(dict(pkg.provenance or {}))
            if at is not None:
                out.commits[f"{rel.name}@{rel.version}"] = at
        for b in s.scalars(select(HostBaseline)):
            out.host_baselines[b.host] = {
                "environment": b.environment,
                "release": b.release,
                "deployment_id": b.deployment_id,
                "recorded_at": b.recorded_at,
            }
        for e in s.scalars(select(EnvironmentBaseline)):
            out.environment_baselines[e.environment] = {
                "release": e.release,
                "deployment_id": e.deployment_id,
                "recorded_at": e.recorded_at,
            }
        for h in s.scalars(select(HostCI)):
            out.host_environments[h.name] = h.environment
    return out
