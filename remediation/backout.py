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

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from orchestrator.backout_runner import BackoutRunner
from orchestrator.change import gate, lifecycle
from orchestrator.cms import deployments
from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import DeploymentRecord, RecordedDeployment
from orchestrator.cms.locks import HostLocks
from orchestrator.cms.models import RFC, Deployment, HostBaseline, utcnow
from orchestrator.errors import AuthorizationRefused, BadInput, ExitCode
from orchestrator.lifecycle import Status
from orchestrator.preparation import runner
from orchestrator.rollout import Baseline, HostAction, Rollout, WavePlan
from orchestrator.sessions import HostSessions
from orchestrator.settings import Settings
from remediation import decisions, recorded
from remediation.survey import HostResult, Outcome, Progress, carry_out, needs_remediation, survey


@dataclass
class BackoutRequest:
    deployment_id: str
    rfcs: list[str]
    actor: str
    plan: Path | None = None
    keep_data: bool = False


def back_out(req: BackoutRequest, settings: Settings, progress: Progress) -> Outcome:
    url = settings.cms_url
    rec = deployments.load(url, req.deployment_id)
    rfc_ids = [gate.parse_rfc_id(r) for r in req.rfcs]
    _refuse_unsafe(rec)
    journal = recorded.journal(url, rec)
    if not journal:
        progress(f"deployment {rec.id} ({rec.status}) never touched a host: nothing to back out")
        return Outcome(0, _report(rec, None, "nothing-to-do", []))
    rollout = recorded.rollout_for(rec, req.plan, progress)
    touched = [a for a in rollout.hosts() if a.host in journal]
    # one run per host: a backout of an interrupted deployment takes over its dead locks
    locks = HostLocks(
        url,
        [a.host for a in touched],
        purpose="backout",
        actor=req.actor,
        release=rec.release,
        takeover=rec.id,
    )
    locks.acquire()
    try:
        return _back_out(req, rec, rfc_ids, rollout, touched, locks, progress)
    finally:
        locks.release()


def _back_out(
    req: BackoutRequest,
    rec: RecordedDeployment,
    rfc_ids: list[int],
    rollout: Rollout,
    touched: list[HostAction],
    locks: HostLocks,
    progress: Progress,
) -> Outcome:
    url = locks.url
    journal = recorded.journal(url, rec)  # as it is now that we hold the hosts
    if rec.status == Status.BACKED_OUT:  # every host it touched was restored
        by = (rec.evidence.get("manual_backout") or {}).get("deployment")
        progress(
            f"deployment {rec.id} was already backed out"
            + (f" (by {by})" if by else "")
            + ": every host it touched is at its prior; nothing changed"
        )
        return Outcome(0, _report(rec, by, "already-backed-out", []))
    which = decisions.supersession(rec.id, _baseline_owners(url, [a.host for a in touched]))
    if which:
        since = sorted({(o.id, o.release) for o in which.values()})
        runs = "; ".join(
            f"{', '.join(sorted(h for h, o in which.items() if o.id == d))} run {release} "
            f"from deployment {d}"
            for d, release in since
        )
        raise BadInput(
            f"deployment {rec.id} was superseded: {runs}. Back out the later deployment "
            f"instead (`ferry remediate backout {since[-1][0]} --rfc ID`), or deploy the "
            "release you want"
        )
    priors = {a.host: a.prior for a in touched}
    record = _open(url, rec, req, rfc_ids, replace(rollout, waves=(WavePlan(1, tuple(touched)),)))
    locks.bind(record.id)
    try:
        _authorize(url, rec, req, rfc_ids, record.id, priors)
    except AuthorizationRefused as exc:
        record.move(Status.REFUSED, evidence={"reasons": exc.reasons, "message": exc.message})
        raise
    record.move(Status.RUNNING)
    progress(
        f"manual backout {record.id} of deployment {rec.id} ({rec.release}, {rec.status}): "
        f"asking {len(touched)} host(s) what they run"
    )
    sessions = HostSessions(rollout)
    try:
        plans = survey(sessions, rollout, journal, keep_data=req.keep_data)
        results = carry_out(BackoutRunner(rollout, sessions, record, progress), plans, progress)
    finally:
        sessions.close()
    status = _record(url, rec, req, rfc_ids, record, rollout, results)
    data = _report(rec, record.id, status, results)
    return Outcome(int(ExitCode.OK if status == "succeeded" else ExitCode.BACKOUT_INCOMPLETE), data)


def _refuse_unsafe(rec: RecordedDeployment) -> None:
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


def _baseline_owners(url: str, hosts: list[str]) -> dict[str, decisions.BaselineOwner | None]:
    """Which deployment last recorded each host's baseline (None: no baseline recorded)."""
    with session_scope(url) as s:
        rows = s.execute(
            select(HostBaseline.host, HostBaseline.deployment_id).where(
                HostBaseline.host.in_(hosts)
            )
        ).all()
        ids = {d for _, d in rows if d is not None}
        deps = {
            d.id: decisions.BaselineOwner(
                d.id, d.strategy, d.status, d.release, (d.evidence or {}).get("backs_out")
            )
            for d in s.scalars(select(Deployment).where(Deployment.id.in_(ids)))
        }
    owned = {h: deps.get(d) if d is not None else None for h, d in rows}
    return {h: owned.get(h) for h in hosts}


def _open(
    url: str,
    rec: RecordedDeployment,
    req: BackoutRequest,
    rfc_ids: list[int],
    rollout: Rollout,
) -> DeploymentRecord:
    hosts = [a.host for a in rollout.hosts()]
    record, _ = DeploymentRecord.open(
        url,
        rollout,
        actor=req.actor,
        rfc_id=rfc_ids[0],
        strategy="backout",
        evidence={"backs_out": rec.id, "rfcs": list(req.rfcs), "runner": runner()},
        audit_action="remediate.backout.started",
        audit_data={"backs_out": rec.id, "rfcs": list(req.rfcs), "hosts": hosts},
    )
    return record


def _authorize(
    url: str,
    rec: RecordedDeployment,
    req: BackoutRequest,
    rfc_ids: list[int],
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
        by_release = {r.release: r.id for r in s.scalars(select(RFC).where(RFC.id.in_(rfc_ids)))}
    for release, hosts in wanted.items():
        rfc_id = by_release.get(release, rfc_ids[0])
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
    rec: RecordedDeployment,
    req: BackoutRequest,
    rfc_ids: list[int],
    record: DeploymentRecord,
    rollout: Rollout,
    results: list[HostResult],
) -> str:
    stuck = needs_remediation(results)
    restored = [r for r in results if r.restored]
    priors = {r.prior for r in results}
    only = next(iter(priors)) if len(priors) == 1 and not stuck else None
    record.set_baselines(
        rec.environment,
        {r.host: r.prior for r in restored},
        environment_baseline=only,
        only_if_environment_was=rec.id,
    )
    DeploymentRecord(url, rec.id, req.actor).move(
        Status.FAILED if stuck else Status.BACKED_OUT,
        evidence={
            "manual_backout": {
                "deployment": record.id,
                "by": req.actor,
                "at": utcnow().isoformat(),
                "status_before": rec.status,
                "restored": [r.host for r in restored],
                "plan_hash": rollout.plan_hash,
            },
            "needs_remediation": stuck,
        },
        audit_data={"manual_backout": record.id, "stuck": stuck},
    )
    with session_scope(url) as s:
        for rfc in s.scalars(select(RFC).where(RFC.id.in_(rfc_ids))):
            if rfc.status == "implementing":
                lifecycle.transition(
                    s,
                    rfc.id,
                    "failed" if stuck else "implemented",
                    actor=req.actor,
                    data={"deployment": record.id},
                )
    status = Status.FAILED if stuck else Status.SUCCEEDED
    record.move(
        status,
        evidence={"hosts": [r.to_dict() for r in results], "needs_remediation": stuck},
    )
    return str(status)


def _report(
    rec: RecordedDeployment,
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
