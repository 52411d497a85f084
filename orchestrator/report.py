"""A deployment's report, made from its record alone (pure): what `ferry deploy` prints.

Whoever ran the flow — this process, a fresh one, a Prefect worker — the report is the
same, because it reads only the CMS: the recorded rollout, the waves' verdicts, the host
outcomes and backout results in the evidence, and the journal's transfer details.
"""

from __future__ import annotations

from typing import Any

from orchestrator.cms.deployments import RecordedDeployment


def deployment_report(rec: RecordedDeployment, journal: list[dict[str, Any]]) -> dict[str, Any]:
    ro = rec.recorded_rollout()
    ev = rec.evidence
    outcomes = rec.latest("outcomes")
    backed = rec.latest("backout")
    stuck = [n["host"] for n in ev.get("needs_remediation", [])]
    hosts: dict[str, Any] = {}
    for name, h in ro.get("hosts", {}).items():
        prior = (h.get("prior") or {}).get("release")
        o = outcomes.get(name)
        if name in backed:
            r = backed[name]
            state = "backed-out" if r["restored"] else "needs-remediation"
            release = prior if r["restored"] else None
        elif o is None:
            state, release = "untouched", prior
        elif o["ok"]:
            state, release = "deployed", rec.release
        else:
            state, release = "failed", prior
        if name in stuck and state == "deployed":
            state = "needs-remediation"
        hosts[name] = {"release": release, "status": state}
        if o is not None and not o["ok"]:
            hosts[name]["failure"] = {
                "step": o["failed_step"],
                "reason": o["reason"],
                "kind": o.get("kind"),
            }
    report: dict[str, Any] = {
        "id": rec.id,
        "status": rec.status,
        "release": rec.release,
        "digest": rec.digest,
        "rfc": str(rec.rfc_id) if rec.rfc_id is not None else None,
        "environment": rec.environment,
        "strategy": rec.strategy,
        "waves": ro.get("waves", []),
        "hosts": hosts,
        "milestones": [w["verdict"] for w in rec.waves if w["verdict"]],
        "backout": ev.get("backout", []),
        "needs_remediation": stuck,
        "bytes_sent": sum(
            int(r["detail"].get("bytes_sent", 0)) for r in journal if r["step"] == "stage"
        ),
        "plan_hash": ro.get("plan_hash"),
    }
    if ro.get("containers"):  # image units: layer bytes sent, apart from the files'
        report["image_bytes_sent"] = sum(
            int(r["detail"].get("image_bytes_sent", 0)) for r in journal if r["step"] == "stage"
        )
        # the switch's downtime per host: from the old container's stop to the new start
        report["container_downtime_s"] = {
            r["host"]: max(c.get("downtime_s", 0.0) for c in r["detail"]["containers"].values())
            for r in journal
            if r["step"] == "activate" and (r.get("detail") or {}).get("containers")
        }
    for key in ("reason", "reasons", "message", "crash_log", "halted_before_wave", "logins"):
        if ev.get(key) is not None:
            report[key] = ev[key]
    return report
