"""Crash recovery: finish a deployment whose process died (SIGKILL, power, OOM) mid-run.

Such a deployment is `planned`/`running` with no finish. Recovery completes its authorized
change's remediation plan, so it needs no RFC of its own (it records audit events):

    1. read the journal: which hosts it touched, how far
    2. ask every touched host its `current` over SSH (the host, not the journal, is truth)
    3. back out every host not on its own prior baseline (`remediation.decisions` decides,
       with `backout_actions`), running the recorded backout commands, journaled under the
       deployment
    4. mark the deployment `backed-out`, or `failed` with `needs_remediation` naming the
       hosts it could not restore; its RFC follows; waves left running become `interrupted`

Idempotent: a second run finds the deployment finished and changes nothing (exit 0).
A deployment whose process is still alive on this machine is refused (stop it first).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.backout_runner import BackoutRunner
from orchestrator.change import lifecycle
from orchestrator.cms import deployments
from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import DeploymentRecord, RecordedDeployment
from orchestrator.cms.locks import HostLocks
from orchestrator.cms.models import RFC, utcnow
from orchestrator.errors import BadInput, ExitCode
from orchestrator.lifecycle import BadTransition, Status
from orchestrator.sessions import HostSessions
from orchestrator.settings import Settings
from remediation import recorded
from remediation.decisions import backout_next_step
from remediation.survey import HostResult, Outcome, Progress, carry_out, needs_remediation, survey


@dataclass
class RecoverRequest:
    deployment_id: str
    actor: str
    plan: Path | None = None
    force: bool = False


def recover(req: RecoverRequest, settings: Settings, progress: Progress) -> Outcome:
    url = settings.cms_url
    rec = deployments.load(url, req.deployment_id)
    if not rec.open:
        items = _still_stuck(rec)
        stuck = [i["host"] for i in items]
        then = backout_next_step(rec.evidence.get("backs_out") or rec.id, rec.release, items)
        progress(
            f"deployment {rec.id} already finished ({rec.status}"
            + (f", {rec.finished_at:%Y-%m-%d %H:%M:%S} UTC" if rec.finished_at else "")
            + "): nothing to recover, nothing changed"
            + (f"; {', '.join(stuck)} still need remediation: {then}" if stuck else "")
        )
        report = {**_report(rec, "already-finished", rec.status, []), "needs_remediation": stuck}
        return Outcome(int(ExitCode.BACKOUT_INCOMPLETE if stuck else ExitCode.OK), report)
    alive = recorded.runner_alive(rec.evidence)
    if alive and not req.force:
        pid = rec.evidence["runner"]["pid"]
        raise BadInput(
            f"deployment {rec.id} is still running (process {pid} on this machine): stop it "
            f"with `kill -TERM {pid}` (it backs out by itself), or pass --force if that "
            "process is not Ferry"
        )
    # one recover at a time, and none beside a live run: it takes over the dead run's locks
    locks = HostLocks(
        url,
        rec.hosts,
        purpose="recover",
        actor=req.actor,
        deployment_id=rec.id,
        release=rec.release,
        takeover=rec.id,
        force=req.force,
    )
    locks.acquire()
    try:
        return _recover(req, rec, url, progress)
    finally:
        locks.release()


def _still_stuck(rec: RecordedDeployment) -> list[dict[str, Any]]:
    """What a finished (failed) deployment records of each host not restored: a recover run
    again changes nothing, and must not read as if nothing were left to do."""
    if rec.status == Status.SUCCEEDED:  # its needs_remediation are hosts not read back
        return []
    return [i for i in rec.evidence.get("needs_remediation") or [] if i.get("host")]


def _recover(req: RecoverRequest, rec: RecordedDeployment, url: str, progress: Progress) -> Outcome:
    rec = deployments.load(url, rec.id)  # as it is now that we hold its hosts
    if not rec.open:
        progress(f"deployment {rec.id} was finished meanwhile ({rec.status}): nothing changed")
        return Outcome(0, _report(rec, "already-finished", rec.status, []))
    journal = deployments.steps_by_host(url, rec.id)
    record = DeploymentRecord(url, rec.id, req.actor)
    if rec.strategy == "backout":
        return _close_backout(rec, record, journal, progress)
    progress(
        f"recovering deployment {rec.id} ({rec.release} to {rec.environment}, {rec.status}, "
        f"started {rec.started_at:%Y-%m-%d %H:%M:%S} UTC): {len(journal)} host(s) in its journal"
    )
    results: list[HostResult] = []
    if journal:
        rollout = recorded.rollout_for(rec, req.plan, progress)
        sessions = HostSessions(rollout)
        try:
            plans = survey(sessions, rollout, journal)
            runner = BackoutRunner(rollout, sessions, record, progress)
            results = carry_out(runner, plans, progress)
        finally:
            sessions.close()
    status = _record(url, rec, req, record, results)
    code = ExitCode.OK if status == "backed-out" else ExitCode.BACKOUT_INCOMPLETE
    return Outcome(int(code), _report(rec, "recovered", status, results))


def _record(
    url: str,
    rec: RecordedDeployment,
    req: RecoverRequest,
    record: DeploymentRecord,
    results: list[HostResult],
) -> str:
    stuck = needs_remediation(results)
    status = Status.FAILED if stuck else Status.BACKED_OUT
    reason = "interrupted (the deploying process died); finished by `ferry remediate recover`"
    try:
        record.move(
            status,
            evidence={
                "reason": rec.evidence.get("reason") or reason,
                "recovered": {
                    "by": req.actor,
                    "at": utcnow().isoformat(),
                    "status_before": rec.status,
                    "hosts": [r.to_dict() for r in results],
                },
                "needs_remediation": stuck,
            },
            audit_data={"recovered": True, "stuck": stuck},
        )
    except BadTransition:  # a concurrent recover got here first
        return record.load().status
    with session_scope(url) as s:
        rfc = s.get(RFC, rec.rfc_id) if rec.rfc_id is not None else None
        if rfc is not None and lifecycle.can_move(rfc.status, status):
            lifecycle.transition(
                s, rfc.id, status, actor=req.actor, note=reason, data={"deployment": rec.id}
            )
    return str(status)


def _close_backout(
    rec: RecordedDeployment,
    record: DeploymentRecord,
    journal: dict[str, dict[str, str]],
    progress: Progress,
) -> Outcome:
    """An interrupted manual backout is closed as failed: re-running the backout finishes it."""
    original = rec.evidence.get("backs_out")
    note = f"interrupted; run `ferry remediate backout {original}` again to finish it"
    record.move(
        Status.FAILED,
        evidence={"reason": note},
        audit_action="remediate.backout.failed",
        audit_data={"backs_out": original, "reason": note, "hosts": sorted(journal)},
    )
    progress(f"deployment {rec.id} was a manual backout of {original}: {note}")
    return Outcome(int(ExitCode.OK), _report(rec, "closed", "failed", []))


def _report(
    rec: RecordedDeployment, action: str, status: str, results: list[HostResult]
) -> dict[str, Any]:
    return {
        "id": rec.id,
        "action": action,
        "status": status,
        "status_before": rec.status,
        "release": rec.release,
        "environment": rec.environment,
        "hosts": {r.host: r.to_dict() for r in results},
        "needs_remediation": [r.host for r in results if not r.restored],
    }
