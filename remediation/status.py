"""Status: what the CMS knows right now, and what needs an on-call's hands. Read-only.

It reads records only (no host is contacted; `ferry remediate drift` asks the hosts):
environment baselines, host baselines, recent deployments with their failing milestone,
and the hosts needing remediation:

    failed        a deployment whose backout could not restore some hosts (its evidence
                  names them): `ferry remediate backout ID` once the cause is fixed
    not read back a succeeded deployment's host that did not answer the final read-back
                  (its milestone had passed): `ferry remediate drift` once it answers
    interrupted   a deployment `planned`/`running` with no finish whose process is not
                  alive on this machine ("possibly interrupted" when Ferry cannot tell, e.g.
                  it ran elsewhere): `ferry remediate recover ID`
    drifted, tampered, unreachable
                  what the newest drift audit covering the host found, until a later
                  audit finds it ok or a deployment records its baseline again: the
                  audit's own next step
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime
from typing import Any

from sqlalchemy import desc, func, select
from sqlalchemy.orm import defer

from orchestrator import lifecycle
from orchestrator.cms import deployments
from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import RecordedDeployment
from orchestrator.cms.models import (
    AuditEvent,
    Deployment,
    EnvironmentBaseline,
    HostBaseline,
    HostStep,
)
from orchestrator.errors import NotFound
from remediation.decisions import DriftAudit, backout_next_step, drift_found, drift_next_step


def reason_of(rec: RecordedDeployment) -> str | None:
    ev = rec.evidence
    milestone = ev.get("failed_milestone") or {}
    if milestone.get("reason"):
        return f"milestone {milestone.get('wave')}: {milestone['reason']}"
    if ev.get("reason"):
        return str(ev["reason"])
    if ev.get("reasons"):
        return "; ".join(map(str, ev["reasons"]))
    if ev.get("backs_out"):
        return f"manual backout of deployment {ev['backs_out']}"
    if ev.get("manual_backout"):
        return f"backed out by hand (deployment {ev['manual_backout'].get('deployment')})"
    return None


def liveness(rec: RecordedDeployment) -> str | None:
    """None for a finished deployment; else running, interrupted or possibly interrupted."""
    if not rec.open:
        return None
    from remediation.recorded import runner_alive  # its module reaches SSH: only when needed

    alive = runner_alive(rec.evidence)
    if alive is None:
        return "possibly interrupted"
    return "running" if alive else "interrupted"


def summary(rec: RecordedDeployment) -> dict[str, Any]:
    return {
        "id": rec.id,
        "status": rec.status,
        "liveness": liveness(rec),
        "release": rec.release,
        "environment": rec.environment,
        "strategy": rec.strategy,
        "rfc": f"RFC-{rec.rfc_id}" if rec.rfc_id is not None else None,
        "actor": rec.actor,
        "started_at": rec.started_at,
        "finished_at": rec.finished_at,
        "reason": reason_of(rec),
        "waves": {str(i): s for i, s in sorted(rec.wave_status.items())},
    }


def remediation_needed(rec: RecordedDeployment, journal_hosts: list[str]) -> list[dict[str, Any]]:
    state = liveness(rec)
    if state in ("interrupted", "possibly interrupted"):
        what = "recover" if rec.strategy != "backout" else "backout"
        target = rec.id if rec.strategy != "backout" else rec.evidence.get("backs_out")
        return [
            {
                "deployment": rec.id,
                "host": h,
                "state": state,
                "reason": f"deployment {rec.id} is {rec.status} with no finish and no live process",
                "next": f"ferry remediate {what} {target}",
            }
            for h in journal_hosts or ["(no host touched)"]
        ]
    out = []
    for item in rec.evidence.get("needs_remediation") or []:
        if rec.status == lifecycle.Status.SUCCEEDED:  # passed its milestone, not read back
            out.append(
                {
                    "deployment": rec.id,
                    "host": item.get("host"),
                    "state": "not read back",
                    "reason": item.get("error"),
                    "next": f"ferry remediate drift --env {rec.environment}",
                }
            )
            continue
        out.append(
            {
                "deployment": rec.id,
                "host": item.get("host"),
                "state": f"current: {item.get('current') or 'unknown'}",
                "reason": item.get("error") or rec.status,
                "next": backout_next_step(
                    rec.evidence.get("backs_out") or rec.id, rec.release, [item]
                ),
            }
        )
    return out


def gather(
    url: str,
    *,
    environment: str | None = None,
    deployment: str | None = None,
    host: str | None = None,
    limit: int = 10,
) -> dict[str, Any]:
    if deployment is not None:
        return {"deployment": detail(url, deployment)}
    with session_scope(url) as s:
        envs = select(EnvironmentBaseline).order_by(EnvironmentBaseline.environment)
        hosts = select(HostBaseline).order_by(HostBaseline.host)
        # the listing and its remediation needs read status, evidence and waves: not the
        # rollouts (~1.7 KB a host each; 0.9 s of CPU for 30 deployments of 1000 hosts)
        deps = select(Deployment).options(defer(Deployment.rollout)).order_by(desc(Deployment.id))
        if environment:
            envs = envs.where(EnvironmentBaseline.environment == environment)
            hosts = hosts.where(HostBaseline.environment == environment)
            deps = deps.where(Deployment.environment == environment)
        if host:
            hosts = hosts.where(HostBaseline.host == host)
            touched = select(HostStep.deployment_id).where(HostStep.host == host).distinct()
            deps = deps.where(Deployment.id.in_(touched))
        env_rows = [_baseline(e, "environment") for e in s.scalars(envs)]
        host_rows = [_baseline(h, "host") for h in s.scalars(hosts)]
        _add_images(s, host_rows)
        recent = [deployments.detach(d, rollout=False) for d in s.scalars(deps.limit(limit))]
        # anything unfinished or failed needs looking at, however old
        open_q = deps.where(Deployment.status.in_((*lifecycle.OPEN, "failed", "aborted")))
        older = [deployments.detach(d, rollout=False) for d in s.scalars(open_q.limit(200))]
        candidates = {r.id: r for r in [*recent, *older]}
        journal = _journal_hosts(s, list(candidates))
        # a host a later deployment has verified since no longer needs this one's remediation
        verified = {b.host: b.deployment_id or 0 for b in s.scalars(select(HostBaseline))}
        drift = _drift_needs(s, host_rows)
    needs = []
    for rec in sorted(candidates.values(), key=lambda r: r.id, reverse=True):
        for item in remediation_needed(rec, journal.get(rec.id, [])):
            if host is not None and item["host"] not in (host, "(no host touched)"):
                continue
            if rec.status == "failed" and verified.get(item["host"], 0) > rec.id:
                continue
            needs.append(item)
    needs += drift
    if host and not host_rows and not recent:
        raise NotFound(f"host {host} has no baseline and no deployment in the CMS")
    return {
        "environments": env_rows,
        "hosts": host_rows,
        "deployments": [summary(r) for r in recent],
        "needs_remediation": needs,
    }


def detail(url: str, deployment: str) -> dict[str, Any]:
    rec = deployments.load(url, deployment)
    with session_scope(url) as s:
        rows = s.scalars(
            select(HostStep).where(HostStep.deployment_id == rec.id).order_by(HostStep.id)
        )
        steps: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            steps[r.host].append(
                {
                    "step": r.step,
                    "status": r.status,
                    "wave": r.wave_index,
                    "finished_at": r.finished_at,
                    **({"error": r.detail["error"]} if (r.detail or {}).get("error") else {}),
                }
            )
    return {
        **summary(rec),
        "digest": rec.digest,
        "plan_file": rec.plan_file,
        # the webhook URL usually carries a token: its host is enough to tell which
        "evidence": {
            k: (_webhook_host(v) if k == "notify" else v)
            for k, v in rec.evidence.items()
            if k != "runner"
        },
        "ci": rec.evidence.get("ci"),
        "hosts": dict(steps),
        "needs_remediation": remediation_needed(rec, list(steps)),
    }


def _webhook_host(notify: Any) -> dict[str, Any]:
    from urllib.parse import urlsplit

    url = (notify or {}).get("webhook") or ""
    return {"webhook": f"{urlsplit(url).scheme}://{urlsplit(url).hostname}/…" if url else None}


def _baseline(row: EnvironmentBaseline | HostBaseline, key: str) -> dict[str, Any]:
    name = row.environment if isinstance(row, EnvironmentBaseline) else row.host
    out: dict[str, Any] = {
        key: name,
        "release": row.release,
        "digest": row.package_digest,
        "deployment": row.deployment_id,
        "recorded_at": row.recorded_at,
    }
    if isinstance(row, HostBaseline):
        out["environment"] = row.environment
    return out


def _add_images(s: Any, rows: list[dict[str, Any]]) -> None:
    """Each host row's image units by image ID (from the package's provenance), if any."""
    from orchestrator.containers import baseline_images

    images = baseline_images(s, {r["digest"] for r in rows})
    for r in rows:
        if images.get(r["digest"]):
            r["images"] = images[r["digest"]]


def _journal_hosts(s: Any, ids: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    if not ids:
        return out
    q = select(HostStep.deployment_id, HostStep.host).where(HostStep.deployment_id.in_(ids))
    for did, h in s.execute(q.distinct()):
        if h not in out[did]:
            out[did].append(h)
    return out


def _drift_needs(s: Any, host_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The hosts of `host_rows` the newest drift audit covering them found not ok. Only the
    newest audit of each scope (an environment, or all) can be a host's newest covering one."""
    newest = (
        select(func.max(AuditEvent.id))
        .where(AuditEvent.action == "remediate.drift")
        .group_by(AuditEvent.subject_id)
    )
    q = select(AuditEvent).where(AuditEvent.id.in_(newest)).order_by(desc(AuditEvent.id))
    audits = [_drift_audit(e) for e in s.scalars(q)]
    rows = {r["host"]: r for r in host_rows}
    found = drift_found({h: (r["environment"], r["recorded_at"]) for h, r in rows.items()}, audits)
    out = []
    for name, audit in sorted(found.items()):
        state, row = audit.not_ok[name], rows[name]
        out.append(
            {
                "deployment": row["deployment"],
                "audit": audit.id,
                "host": name,
                "state": state,
                "reason": f"the drift audit of {audit.at:%Y-%m-%d %H:%M:%S} found it {state}; "
                f"its baseline is {row['release']}",
                "next": drift_next_step(state, row["release"], name not in audit.unlisted),
            }
        )
    return out


def _drift_audit(event: AuditEvent) -> DriftAudit:
    data = event.data or {}
    return DriftAudit(
        event.id,
        _audit_start(event),
        None if event.subject_id == "*" else event.subject_id,
        data.get("not_ok") or {},
        frozenset(data.get("unlisted") or ()),  # audits before it was recorded: none
    )


def _audit_start(event: AuditEvent) -> datetime:
    """When a drift audit read the baselines it judged (its event is written at its end: a
    deployment that recorded a host while the audit ran is newer than what it judged)."""
    started = (event.data or {}).get("started")
    try:
        return datetime.fromisoformat(started) if started else event.at
    except (TypeError, ValueError):
        return event.at
