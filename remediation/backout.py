"""Manual backout: return every host a deployment touched to its own prior baseline.

For a deployment that succeeded and turned out bad, or one that failed or was interrupted.
It is a change too, so it runs under an RFC authorizing deploy of the PRIOR release in that
environment (or an emergency RFC), checked by the same gate as a deployment.

Records: a new Deployment row (strategy `backout`, evidence `backs_out: <id>`) whose journal
holds every backout step; HostBaseline rows follow the hosts that were restored (to the
prior); the original deployment is marked `backed-out` (or `failed` with the hosts that
need remediation) with `manual_backout` evidence; the backout's RFC is implemented (or
failed). Exit 0 when every host is restored, 5 when some are not (named with their state).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.change import gate, lifecycle
from orchestrator.cms import audit
from orchestrator.cms.db import session_scope
from orchestrator.cms.models import RFC, Deployment, EnvironmentBaseline, HostBaseline, utcnow
from orchestrator.errors import AuthorizationRefused, BadInput, ExitCode
from orchestrator.planner import Baseline
from orchestrator.settings import Settings
from remediation import recorded
from remediation.restore import HostResult, Outcome, Progress, carry_out, needs_remediation, survey


@dataclass
class BackoutRequest:
    deployment_id: str
    rfcs: list[str]
    actor: str
    inventory: Path | None = None
    plan: Path | None = None
    keep_data: bool = False


def back_out(req: BackoutRequest, settings: Settings, progress: Progress) -> Outcome:
    url = settings.cms_url
    rec = recorded.load(url, req.deployment_id)
    _refuse_unsafe(rec)
    journal = recorded.journal(url, rec)
    if not journal:
        progress(f"deployment {rec.id} ({rec.status}) never touched a host: nothing to back out")
        return Outcome(0, _report(rec, None, "nothing-to-do", []))
    priors = recorded.priors(url, rec)
    plan, plan_path = recorded.resolve_plan(rec, req.plan)
    inventory = recorded.resolve_inventory(settings, req.inventory, plan)
    rollout = recorded.rebuild_rollout(url, rec, plan, inventory, priors)
    hosts = list(journal)
    backout_id = _open(url, rec, req, plan_path, {h: priors.get(h) for h in hosts})
    try:
        _authorize(url, rec, req, backout_id, {h: priors.get(h) for h in hosts})
    except AuthorizationRefused as exc:
        _finish_backout(url, backout_id, "refused", {"reasons": exc.reasons}, req.actor)
        raise
    progress(
        f"manual backout {backout_id} of deployment {rec.id} ({rec.release}, {rec.status}): "
        f"asking {len(hosts)} host(s) what they run"
    )
    executor = recorded.backout_executor(
        settings=settings,
        rec=rec,
        rollout=rollout,
        plan=plan,
        inventory=inventory,
        journal_deployment=backout_id,
        progress=progress,
    )
    try:
        plans = survey(executor, rollout, journal, priors, keep_data=req.keep_data)
        results = carry_out(executor, rollout, plans, progress)
    finally:
        executor.close()
    status = _record(url, rec, req, backout_id, results)
    data = _report(rec, backout_id, status, results)
    return Outcome(int(ExitCode.OK if status == "succeeded" else ExitCode.BACKOUT_INCOMPLETE), data)


def _refuse_unsafe(rec: recorded.RecordedDeployment) -> None:
    if rec.strategy == "backout":
        raise BadInput(
            f"deployment {rec.id} is itself a manual backout (of deployment "
            f"{rec.evidence.get('backs_out')}); to move forward again, deploy the release"
        )
    if rec.open and recorded.runner_alive(rec.evidence):
        pid = rec.evidence["runner"]["pid"]
        raise BadInput(
            f"deployment {rec.id} is still running (process {pid} on this machine): stop it "
            f"with `kill -TERM {pid}` (it backs out by itself), then check `ferry status`"
        )


def _open(
    url: str,
    rec: recorded.RecordedDeployment,
    req: BackoutRequest,
    plan_path: Path,
    priors: dict[str, Baseline | None],
) -> int:
    with session_scope(url) as s:
        row = Deployment(
            rfc_id=gate.parse_rfc_id(req.rfcs[0]),
            release=rec.release,
            package_digest=rec.digest,
            environment=rec.environment,
            plan_file=str(plan_path),
            strategy="backout",
            method="push",
            status="running",
            rollout={
                "backs_out": rec.id,
                "waves": [list(priors)],
                "prior": {h: (p.release if p else None) for h, p in priors.items()},
                "prior_digest": {h: (p.digest if p else None) for h, p in priors.items()},
            },
            evidence={
                "backs_out": rec.id,
                "rfcs": list(req.rfcs),
                "runner": {"pid": os.getpid(), "host": socket.gethostname()},
            },
            actor=req.actor,
        )
        s.add(row)
        s.flush()
        audit.append(
            s,
            actor=req.actor,
            action="remediate.backout.started",
            subject_type="deployment",
            subject_id=rec.id,
            data={"backout": row.id, "rfcs": list(req.rfcs), "hosts": list(priors)},
        )
        return row.id


def _authorize(
    url: str,
    rec: recorded.RecordedDeployment,
    req: BackoutRequest,
    backout_id: int,
    priors: dict[str, Baseline | None],
) -> None:
    """Each distinct prior release needs an RFC authorizing its deploy here, now.

    Hosts without a prior baseline lose `current` altogether: that needs an RFC for the
    deployment's own release (it removes it)."""
    wanted: dict[str, list[str]] = {}
    for host, prior in priors.items():
        wanted.setdefault(prior.release if prior else rec.release, []).append(host)
    with session_scope(url) as s:
        ids = [gate.parse_rfc_id(r) for r in req.rfcs]
        by_release = {r.release: r.id for r in s.scalars(select(RFC).where(RFC.id.in_(ids)))}
    for release, hosts in wanted.items():
        rfc_id = by_release.get(release, ids[0])
        with session_scope(url) as s:
            gate.require(
                s,
                rfc_id=rfc_id,
                stage="deploy",
                release=release,
                environment=rec.environment,
                hosts=hosts,
                now=utcnow(),
                actor=req.actor,
            )
    with session_scope(url) as s:
        for rfc_id in sorted(set(by_release.values())):
            lifecycle.transition(
                s, rfc_id, "implementing", actor=req.actor, data={"deployment": backout_id}
            )


def _record(
    url: str,
    rec: recorded.RecordedDeployment,
    req: BackoutRequest,
    backout_id: int,
    results: list[HostResult],
) -> str:
    stuck = needs_remediation(results)
    status = "failed" if stuck else "succeeded"
    restored = [r for r in results if r.restored]
    with session_scope(url) as s:
        for r in restored:
            row = s.get(HostBaseline, r.host)
            if r.prior is None:
                if row is not None:
                    s.delete(row)
                continue
            row = row or HostBaseline(host=r.host)
            row.environment, row.release = rec.environment, r.prior.release
            row.package_digest, row.deployment_id = r.prior.digest, backout_id
            row.recorded_at = utcnow()
            s.merge(row)
        env = s.get(EnvironmentBaseline, rec.environment)
        priors = {r.prior for r in results}
        if env is not None and env.deployment_id == rec.id and not stuck and len(priors) == 1:
            (prior,) = priors
            if prior is not None:
                env.release, env.package_digest = prior.release, prior.digest
                env.deployment_id, env.recorded_at = backout_id, utcnow()
        dep = s.get(Deployment, rec.id)
        assert dep is not None
        evidence = {
            "manual_backout": {
                "deployment": backout_id,
                "by": req.actor,
                "at": utcnow().isoformat(),
                "status_before": rec.status,
                "restored": [r.host for r in restored],
            },
            "needs_remediation": stuck,
        }
        dep.evidence = {**(dep.evidence or {}), **evidence}
        dep.status = "failed" if stuck else "backed-out"
        dep.finished_at = dep.finished_at or utcnow()
        audit.append(
            s,
            actor=req.actor,
            action=f"deploy.{dep.status}",
            subject_type="deployment",
            subject_id=rec.id,
            data={"release": rec.release, "manual_backout": backout_id, "stuck": stuck},
        )
        ids = {gate.parse_rfc_id(r) for r in req.rfcs}
        for rfc in s.scalars(select(RFC).where(RFC.id.in_(ids))):
            if rfc.status == "implementing":
                lifecycle.transition(
                    s,
                    rfc.id,
                    "failed" if stuck else "implemented",
                    actor=req.actor,
                    data={"deployment": backout_id},
                )
    _finish_backout(
        url,
        backout_id,
        status,
        {"hosts": [r.to_dict() for r in results], "needs_remediation": stuck},
        req.actor,
    )
    return status


def _finish_backout(
    url: str, backout_id: int, status: str, evidence: dict[str, Any], actor: str
) -> None:
    with session_scope(url) as s:
        row = s.get(Deployment, backout_id)
        assert row is not None
        row.status, row.finished_at = status, utcnow()
        row.evidence = {**(row.evidence or {}), **evidence}
        audit.append(
            s,
            actor=actor,
            action=f"remediate.backout.{status}",
            subject_type="deployment",
            subject_id=backout_id,
            data={"backs_out": (row.evidence or {}).get("backs_out"), **evidence},
        )


def _report(
    rec: recorded.RecordedDeployment,
    backout_id: int | None,
    status: str,
    results: list[HostResult],
) -> dict[str, Any]:
    return {
        "id": backout_id,
        "backs_out": rec.id,
        "status": status,
        "release": rec.release,
        "environment": rec.environment,
        "hosts": {r.host: r.to_dict() for r in results},
        "needs_remediation": [r.host for r in results if not r.restored],
    }
