"""The governance report: every figure, and the dashboard's rows, from `Records` (pure).

    governance_report(records, period, now, environment=None, production="production")

returns one JSON-ready dict: `change` (ITIL change KPIs), `release` (release and
deployment figures), `dora` (the four keys for the production environment), `els` (early
life support outcomes), and `dashboard` (environments × releases, recent deployments,
RFCs awaiting action). Nothing here reads the CMS or the clock.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from orchestrator.insight.dora import dora_keys
from orchestrator.insight.figure import Period, figure, iso
from orchestrator.insight.kpis import change_kpis, in_env, release_figures, restorations
from orchestrator.insight.records import Records

OPEN_DEPLOYMENT = frozenset({"planned", "running", "backing-out"})
AWAITING = {
    "draft": "submit it",
    "submitted": "assess it",
    "assessed": "approve or reject it",
    "authorized": "implement it (ferry deploy)",
    "scheduled": "implement it in its window (ferry deploy)",
    "implementing": "deployment in progress",
}


def governance_report(
    records: Records,
    period: Period,
    now: datetime,
    *,
    environment: str | None = None,
    production: str = "production",
) -> dict[str, Any]:
    return {
        "period": period.to_dict(),
        "environment": environment,
        "generated_at": iso(now),
        "change": change_kpis(
            records.rfcs,
            records.deployments,
            records.drift_audits,
            records.host_environments,
            period,
            environment,
        ),
        "release": release_figures(records.deployments, period, now, environment),
        "dora": dora_keys(records.deployments, records.commits, period, environment or production),
        "els": els_figures(records.deployments, period, environment),
        "dashboard": dashboard_rows(records, now, environment),
    }


def els_figures(
    deployments: list[dict[str, Any]], period: Period, environment: str | None
) -> dict[str, Any]:
    rows = []
    for d in deployments:
        els = d.get("els")
        if not els or d["started_at"] not in period or not in_env(d, environment):
            continue
        rows.append(
            {
                "deployment": d["id"],
                "environment": d["environment"],
                "release": d["release"],
                "until": els.get("until"),
                "runs": len(els.get("runs", [])),
                "failures": [
                    {"at": r["at"], "failed": r["failed"]}
                    for r in els.get("runs", [])
                    if r.get("failed")
                ],
                "outcome": (els.get("outcome") or {}).get("outcome", "in-progress"),
            }
        )
    outcomes = Counter(r["outcome"] for r in rows)
    return {
        "deployments": figure(
            len(rows),
            "deployments of the period whose plan declared early life support",
            "deployments",
            outcomes=dict(outcomes),
        ),
        "failed": figure(
            sum(1 for r in rows if r["failures"]),
            "of those, deployments with at least one failed ELS check run",
            "deployments",
        ),
        "rows": rows,
    }


def dashboard_rows(records: Records, now: datetime, environment: str | None) -> dict[str, Any]:
    """What runs where (environments × releases), recent deployments, RFCs awaiting action."""
    deps = records.deployments
    in_flight: dict[str, dict[str, Any]] = {}
    for d in deps:
        if d["status"] in OPEN_DEPLOYMENT and d["finished_at"] is None:
            for h in d["hosts"]:
                in_flight[h] = {"deployment": d["id"], "release": d["release"]}
    stuck = {r["host"]: r for r in restorations(deps, now) if r["open"]}
    hosts: dict[str, dict[str, Any]] = {}
    for name, b in records.host_baselines.items():
        hosts[name] = {"environment": b["environment"], "release": b["release"]}
    for name in in_flight:
        env = records.host_environments.get(name)
        hosts.setdefault(name, {"environment": env, "release": None})
    for name, r in stuck.items():
        hosts.setdefault(name, {"environment": r["environment"], "release": None})
    for name, h in hosts.items():
        h["state"] = (
            "in-flight"
            if name in in_flight
            else "needs-remediation"
            if name in stuck
            else "baseline"
        )
        if name in in_flight:
            h["in_flight"] = in_flight[name]
    envs = sorted(
        e
        for e in set(records.environments) | {h["environment"] for h in hosts.values()}
        if e and (environment is None or e == environment)
    )
    grid: dict[str, dict[str, Any]] = {}
    for env in envs:
        members = {n: h for n, h in sorted(hosts.items()) if h["environment"] == env}
        releases: dict[str, list[str]] = defaultdict(list)
        for n, h in members.items():
            releases[h["release"] or "(none)"].append(n)
        base = records.environment_baselines.get(env)
        grid[env] = {
            "baseline": base["release"] if base else None,
            "hosts": members,
            "releases": {r: sorted(v) for r, v in sorted(releases.items())},
            "in_flight": sorted(
                {h["in_flight"]["release"] for h in members.values() if "in_flight" in h}
            ),
            "needs_remediation": sorted(
                n for n, h in members.items() if h["state"] == "needs-remediation"
            ),
        }
    recent = [
        {
            "id": d["id"],
            "environment": d["environment"],
            "release": d["release"],
            "strategy": d["strategy"],
            "status": d["status"],
            "rfc": d["rfc_id"],
            "started_at": iso(d["started_at"]),
            "finished_at": iso(d["finished_at"]),
            "els": ((d.get("els") or {}).get("outcome") or {}).get("outcome")
            or ("in-progress" if d.get("els") else None),
            "waves": [
                {"index": w["index"], "hosts": len(w["hosts"]), "status": w["status"]}
                for w in d["waves"]
            ],
        }
        for d in sorted(deps, key=lambda d: d["id"], reverse=True)
        if in_env(d, environment)
    ][:15]
    awaiting = []
    for r in records.rfcs:
        if not in_env(r, environment):
            continue
        action = AWAITING.get(r["status"])
        if r["needs_review"]:
            action = "post-implementation review (ferry rfc close)"
        if action:
            awaiting.append(
                {
                    "id": r["id"],
                    "status": r["status"],
                    "model": r["model"],
                    "environment": r["environment"],
                    "release": r["release"],
                    "action": action,
                }
            )
    return {
        "environments": envs,
        "grid": grid,
        "recent_deployments": recent,
        "rfcs_awaiting_action": awaiting,
    }
