"""DORA's four keys for one environment (production by default), pure.

deployment frequency   succeeded deployments of releases to the environment / days
lead time for changes  deployed (the succeeded deployment's finish) − the source commit
                       time in the package's provenance (git committer time)
change failure rate    deployments that failed in production (backed out automatically or
                       by hand, failed, aborted, halted) / deployments that ran to an end
time to restore        failure detected (the failed milestone's verdict; a deployment
                       backed out by hand: the backout's start) → restored (the last
                       backout step's end; the manual backout's finish)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from orchestrator.insight.figure import Period, durations, figure, ratio, seconds
from orchestrator.insight.kpis import BACKED_OUT, FINAL, backout_seconds, forward, succeeded


def restore_seconds(dep: dict[str, Any], deployments: list[dict[str, Any]]) -> float | None:
    """How long the environment took to get back to its prior state after this failure."""
    manual = dep.get("manual_backout")
    if manual:
        backout = next((d for d in deployments if d["id"] == manual.get("deployment")), None)
        return backout_seconds(backout) if backout else None
    if dep["status"] in BACKED_OUT:
        return backout_seconds(dep)
    return None  # failed/aborted/halted: hosts still need remediation (see MTRS)


def dora_keys(
    deployments: list[dict[str, Any]],
    commits: dict[str, datetime],
    period: Period,
    environment: str,
) -> dict[str, Any]:
    deps = [
        d
        for d in forward(deployments)
        if d["environment"] == environment and d["started_at"] in period
    ]
    ran = [d for d in deps if d["status"] in FINAL or d.get("manual_backout")]
    # a deployment that succeeded and was then backed out by hand did reach production
    deployed = [d for d in ran if succeeded(d)]
    failed = [d for d in ran if d["status"] != "succeeded"]
    leads, no_commit = [], []
    for d in deployed:
        at = commits.get(d["release"])
        if at is None or d["finished_at"] is None:
            no_commit.append(d["id"])
        else:
            leads.append(seconds(d["finished_at"] - at))
    restores = [(d["id"], restore_seconds(d, deployments)) for d in failed]
    per_day = len(deployed) / period.days if period.days else 0.0
    return {
        "environment": environment,
        "deployment_frequency": figure(
            round(per_day, 4),
            f"deployments of releases to {environment} that succeeded (including ones later "
            "backed out by hand), started in the period, / the period's days",
            "per day",
            deployments=len(deployed),
            per_week=round(per_day * 7, 4),
        ),
        "lead_time_for_changes": {
            **durations(
                leads,
                "each of those deployments' finish − its release's source commit time "
                "(git committer time in the package provenance)",
            ),
            "without_commit_time": no_commit,
        },
        "change_failure_rate": figure(
            ratio(len(failed), len(ran)),
            f"deployments to {environment} that failed (backed out automatically or by hand, "
            "integrity-failed, failed, aborted, halted) / deployments that ran to an end",
            "ratio",
            failed=len(failed),
            deployments=len(ran),
        ),
        "time_to_restore": {
            **durations(
                [t for _i, t in restores if t is not None],
                "failure detected (failed milestone's verdict; for a manual backout its start) "
                "→ restored (last backout step's end; the manual backout's finish); failures "
                "not restored are listed as unrestored",
            ),
            "unrestored": [i for i, t in restores if t is None],
        },
    }
