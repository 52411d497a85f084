"""`ferry els run`: early life support checks of succeeded deployments, and their close (Act).

For each deployment under ELS (its plan declared `els:`) the pure `orchestrator.els`
decides: run the checks now, wait, or close the period. Checks run on each host over one
agent session (as the milestone checks do), read-only; each run and the close are written
through the deployment record (`DeploymentRecord.els_run` / `els_close`). A failed check
names `ferry remediate backout` as the way back.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from sqlalchemy import select

from orchestrator import els as decide
from orchestrator.cms import deployments
from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import DeploymentRecord, RecordedDeployment
from orchestrator.cms.models import Deployment, utcnow
from orchestrator.errors import FerryError
from orchestrator.sessions import HostSessions
from orchestrator.settings import Settings

Progress = Callable[[str], None]


def under_els(url: str) -> list[int]:
    """Deployments whose evidence holds an ELS without an outcome yet."""
    with session_scope(url) as s:
        rows = s.scalars(select(Deployment).order_by(Deployment.id))
        return [
            d.id
            for d in rows
            if (d.evidence or {}).get("els") and not d.evidence["els"].get("outcome")
        ]


def run_checks(rec: RecordedDeployment, els: dict[str, Any]) -> dict[str, Any]:
    """Every host's ELS checks, now: {host: [evidence…]} and the hosts that failed."""
    rollout = rec.plan()
    ok_hosts = [h for h, o in rec.latest("outcomes").items() if o.get("ok")]
    actions = [a for a in rollout.hosts() if a.host in ok_hosts and decide.checks_of(els, a.host)]
    sessions = HostSessions(rollout)

    def one(action: Any) -> tuple[str, bool, list[str]]:
        evidence: list[str] = []
        try:
            ops = sessions.ops(action)
            good = True
            for check in decide.checks_of(els, action.host):
                passed, text = ops.check(check)
                evidence.append(("ok " if passed else "FAILED ") + text)
                good = good and passed
            return action.host, good, evidence
        except FerryError as exc:  # unreachable, agent refused: the check did not pass
            return action.host, False, [*evidence, f"FAILED: {exc.message}"]

    try:
        with ThreadPoolExecutor(max_workers=max(1, min(20, len(actions)))) as pool:
            results = list(pool.map(one, actions))
    finally:
        sessions.close()
    return {
        "at": utcnow().isoformat(),
        "hosts": {h: ev for h, _ok, ev in results},
        "failed": sorted(h for h, ok, _ev in results if not ok),
    }


def els_run(
    settings: Settings,
    progress: Progress,
    deployment: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    url = settings.cms_url
    ids = [deployments.parse_deployment_id(deployment)] if deployment else under_els(url)
    report: list[dict[str, Any]] = []
    for did in ids:
        rec = deployments.load(url, did)
        els = rec.evidence.get("els")
        if not els:
            report.append({"deployment": did, "action": "none", "why": "its plan has no els:"})
            continue
        at = now or utcnow()
        action = decide.next_action(els, rec.status, rec.finished_at, at)
        until = decide.period_end(els, rec.finished_at).isoformat() if rec.finished_at else None
        record = DeploymentRecord(url, rec.id, settings.actor)
        row: dict[str, Any] = {"deployment": did, "release": rec.release, "action": action}
        if action == "run":
            assert until is not None
            progress(f"deployment {did} ({rec.release}): early life support checks")
            run = run_checks(rec, els)
            record.els_run(run, until)
            row.update(failed=run["failed"], hosts=run["hosts"], until=until)
            if run["failed"]:
                row["next"] = f"ferry remediate backout {did} --rfc RFC"
                progress(
                    f"  ELS check failed on {', '.join(run['failed'])}: recorded against "
                    f"deployment {did}; to return to the prior release: {row['next']}"
                )
        elif action == "close":
            after = deployments.load(url, did).evidence.get("els") or els
            outcome = {
                "outcome": decide.outcome_of(after),
                "at": at.isoformat(),
                "runs": len(after.get("runs", [])),
                "failed_runs": sum(1 for r in after.get("runs", []) if r.get("failed")),
                "deployment_status": rec.status,
            }
            record.els_close(outcome, until or at.isoformat())
            row.update(outcome=outcome)
            progress(f"deployment {did}: early life support ended: {outcome['outcome']}")
        report.append(row)
    return {"deployments": report}
