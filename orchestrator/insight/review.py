"""One change's own figures, for its post-implementation review (pure).

`ferry rfc close` records these with the review: what the deployments under the RFC did —
hosts, waves, failed milestones, backout (automatic or manual) and how long it took, hosts
left needing remediation, and the early life support result.
"""

from __future__ import annotations

from typing import Any

from orchestrator.insight.figure import iso
from orchestrator.insight.kpis import FINAL, backout_seconds, change_outcome, switched_hosts


def change_review(rfc_id: int, deployments: list[dict[str, Any]]) -> dict[str, Any]:
    mine = [d for d in deployments if d["rfc_id"] == rfc_id]
    rows = []
    for d in mine:
        els = d.get("els") or {}
        rows.append(
            {
                "deployment": d["id"],
                "release": d["release"],
                "environment": d["environment"],
                "strategy": d["strategy"],
                "status": d["status"],
                "started_at": iso(d["started_at"]),
                "finished_at": iso(d["finished_at"]),
                "hosts": len(d["hosts"]),
                "hosts_switched": len(switched_hosts(d)),
                "waves": len(d["waves"]),
                # not "waves_passed": the audit log redacts keys that look like a password
                "waves_ok": sum(w["status"] == "passed" for w in d["waves"]),
                "failed_milestones": [
                    {"wave": w["index"], "failed_hosts": w["failed"], "reason": w["reason"]}
                    for w in d["waves"]
                    if w["status"] == "failed"
                ],
                "failed_hosts": d["failed_hosts"],
                "backed_out": d["status"] in ("backed-out", "integrity-failed"),
                "manual_backout": (d.get("manual_backout") or {}).get("deployment"),
                "backout_seconds": backout_seconds(d),
                "needs_remediation": d["needs_remediation"],
                "els": (els.get("outcome") or {}).get("outcome")
                or ("in-progress" if els else None),
                "els_failed_runs": sum(1 for r in els.get("runs", []) if r.get("failed")),
            }
        )
    ran = [r for r in rows if r["status"] in FINAL]  # a refused start touched nothing
    return {
        "outcome": change_outcome(rfc_id, deployments),
        "deployments": rows,
        "hosts": sum(r["hosts"] for r in ran),
        "hosts_switched": sum(r["hosts_switched"] for r in ran),
        "waves": sum(r["waves"] for r in ran),
        "failed_milestones": sum(len(r["failed_milestones"]) for r in ran),
        "backed_out": any(r["backed_out"] for r in ran),
        "needs_remediation": sorted({h for r in ran for h in r["needs_remediation"]}),
        "els": next((r["els"] for r in reversed(ran) if r["els"]), None),
    }
