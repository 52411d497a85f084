"""ITIL change KPIs and release & deployment figures (pure: plain rows in, figures out).

A *change* is an RFC raised in the period. Its outcome is read from the deployments that
implemented it (the last one that ran, by id; a refused start did not implement it):

    successful      it succeeded (a manual backout under an RFC is a change too)
    backed-out      backed-out or integrity-failed: every touched host was restored,
                    automatically or later by `ferry remediate backout`
    failed          failed, aborted or halted: hosts need remediation, or it stopped half-way
    not-implemented no deployment ran under it (yet)

Deployment figures count the deployments *started* in the period; manual backouts
(strategy `backout`) are counted apart, as restorations.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from typing import Any

from orchestrator.insight.figure import Period, durations, figure, iso, ratio, seconds

MODELS = ("standard", "normal", "emergency")
FINAL = frozenset({"succeeded", "backed-out", "integrity-failed", "failed", "aborted", "halted"})
BACKED_OUT = frozenset({"backed-out", "integrity-failed"})
FAILED = frozenset({"failed", "aborted", "halted"})
BACKOUT_STEPS = frozenset({"revert", "reactivate", "restore", "recheck"})
UNAUTHORIZED = frozenset({"drifted", "tampered"})


def in_env(row: dict[str, Any], environment: str | None) -> bool:
    return environment is None or row.get("environment") == environment


def change_outcome(rfc_id: int, deployments: list[dict[str, Any]]) -> str:
    ran = [d for d in deployments if d["rfc_id"] == rfc_id and d["status"] in FINAL]
    if not ran:
        return "not-implemented"
    last = max(ran, key=lambda d: d["id"])["status"]
    if last == "succeeded":
        return "successful"
    return "backed-out" if last in BACKED_OUT else "failed"


def succeeded(dep: dict[str, Any]) -> bool:
    """It succeeded when it finished (a later manual backout does not undo that it ran)."""
    before = (dep.get("manual_backout") or {}).get("status_before")
    return dep["status"] == "succeeded" or before == "succeeded"


def forward(deployments: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Deployments of releases (manual backouts left out)."""
    return [d for d in deployments if d["strategy"] != "backout"]


def change_kpis(
    rfcs: list[dict[str, Any]],
    deployments: list[dict[str, Any]],
    drift_audits: list[dict[str, Any]],
    host_environments: dict[str, str | None],
    period: Period,
    environment: str | None = None,
) -> dict[str, Any]:
    changes = [r for r in rfcs if r["created_at"] in period and in_env(r, environment)]
    by_model = Counter(r["model"] for r in changes)
    outcomes = {r["id"]: change_outcome(r["id"], deployments) for r in changes}
    done = [i for i, o in outcomes.items() if o != "not-implemented"]
    count = Counter(outcomes.values())
    unauthorized: list[dict[str, Any]] = []
    for audit in drift_audits:
        if audit["at"] not in period:
            continue
        for host, state in sorted(audit["not_ok"].items()):
            if state in UNAUTHORIZED and (
                environment is None or host_environments.get(host) == environment
            ):
                unauthorized.append({"host": host, "state": state, "at": iso(audit["at"])})
    lead = _lead_times(changes, deployments)
    awaiting = [
        {"rfc": r["id"], "review_due": iso(r["review_due"])}
        for r in rfcs
        if r["model"] == "emergency" and r["needs_review"] and in_env(r, environment)
    ]
    approvals: dict[str, dict[str, Any]] = {}
    self_approved = 0
    for r in changes:
        for a in r["approvals"]:
            if a["decision"] != "approved":
                continue
            who = approvals.setdefault(a["approver"], {"approvals": 0, "roles": {}})
            who["approvals"] += 1
            who["roles"][a["role"]] = who["roles"].get(a["role"], 0) + 1
            self_approved += a["approver"] == r["requester"]
    return {
        "changes": figure(
            len(changes), "RFCs raised in the period (created_at inside it)", "changes"
        ),
        "by_model": {
            m: figure(
                by_model.get(m, 0),
                f"RFCs of the {m} change model among the changes; share = count / changes",
                "changes",
                share=ratio(by_model.get(m, 0), len(changes)),
            )
            for m in MODELS
        },
        "implemented": figure(
            len(done),
            "changes with at least one deployment that ran to a final status "
            "(succeeded, backed-out, integrity-failed, failed, aborted, halted)",
            "changes",
        ),
        "success_rate": figure(
            ratio(count.get("successful", 0), len(done)),
            "changes whose last deployment succeeded / implemented changes",
            "ratio",
            successful=count.get("successful", 0),
        ),
        "backed_out": figure(
            count.get("backed-out", 0),
            "changes whose last deployment ended backed-out or integrity-failed (every "
            "touched host restored: automatically, or by ferry remediate backout)",
            "changes",
        ),
        "failed": figure(
            count.get("backed-out", 0) + count.get("failed", 0),
            "implemented changes that did not succeed: backed out, plus failed/aborted/halted "
            "(hosts left needing remediation or a rollout stopped half-way)",
            "changes",
            needing_remediation=count.get("failed", 0),
        ),
        "unauthorized_found_by_drift": figure(
            len(unauthorized),
            "hosts that drift audits in the period found drifted (current is not the CMS "
            "baseline's release) or tampered (files differ from the DML manifest); one per "
            "host per audit",
            "hosts",
            hosts=unauthorized,
        ),
        "lead_time": lead,
        "emergency_awaiting_review": figure(
            len(awaiting),
            "emergency RFCs flagged for post-implementation review and not yet closed "
            "(now, whatever the period)",
            "changes",
            rfcs=awaiting,
        ),
        "approvals_per_approver": figure(
            dict(sorted(approvals.items())),
            "approvals (decision approved) on the period's changes, per approver and role",
            "approvals",
            self_approvals=self_approved,
        ),
        "outcomes": {str(i): o for i, o in sorted(outcomes.items())},
    }


def _lead_times(changes: list[dict[str, Any]], deployments: list[dict[str, Any]]) -> dict:
    implemented: dict[int, datetime] = {}
    for d in sorted(deployments, key=lambda d: d["id"]):
        if succeeded(d) and d["rfc_id"] is not None and d["finished_at"]:
            implemented.setdefault(d["rfc_id"], d["finished_at"])
    sub_auth, auth_impl, sub_impl = [], [], []
    for r in changes:
        sub, auth, impl = r["submitted_at"], r["authorized_at"], implemented.get(r["id"])
        if sub and auth:
            sub_auth.append(seconds(auth - sub))
        if auth and impl:
            auth_impl.append(seconds(impl - auth))
        if sub and impl:
            sub_impl.append(seconds(impl - sub))
    return {
        "submitted_to_authorized": durations(
            sub_auth, "RFC authorized_at − submitted_at, over changes that were authorized"
        ),
        "authorized_to_implemented": durations(
            auth_impl,
            "finish of the RFC's first succeeded deployment (even if later backed out by "
            "hand) − authorized_at",
        ),
        "submitted_to_implemented": durations(
            sub_impl, "finish of the RFC's first succeeded deployment − submitted_at"
        ),
    }


def switched_hosts(dep: dict[str, Any]) -> list[str]:
    """Hosts whose `current` this deployment switched (its activate step finished ok)."""
    return sorted(
        {s["host"] for s in dep["steps"] if s["step"] == "activate" and s["status"] == "succeeded"}
    )


def backout_seconds(dep: dict[str, Any]) -> float | None:
    """Verdict → restored: from the failed milestone's verdict (a manual backout: its start)
    to the last backout step's end."""
    if dep["strategy"] == "backout":
        if dep["finished_at"] is None or dep["status"] != "succeeded":
            return None
        return seconds(dep["finished_at"] - dep["started_at"])
    failed = [w for w in dep["waves"] if w["status"] == "failed" and w["finished_at"]]
    ends = [
        s["finished_at"]
        for s in dep["steps"]
        if s["step"] in BACKOUT_STEPS and s["finished_at"] is not None
    ]
    if not failed or not ends or dep["status"] not in BACKED_OUT:
        return None
    return seconds(max(ends) - failed[0]["finished_at"])


def restorations(deployments: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    """Hosts a deployment left needing remediation, and when (if) a later manual backout
    or deployment restored them: MTRS runs from the failure to the restoration."""
    out: list[dict[str, Any]] = []
    for d in deployments:
        if d["finished_at"] is None or d["strategy"] == "backout":
            continue
        for host in sorted(set(d["needs_remediation"])):
            restored = None
            for later in deployments:
                if later["id"] <= d["id"] or later["finished_at"] is None:
                    continue
                if later["status"] != "succeeded" or host in later["needs_remediation"]:
                    continue
                if host in later["hosts"] and (
                    later["backs_out"] == d["id"] or later["strategy"] != "backout"
                ):
                    restored = later["finished_at"]
                    break
            end = restored or now
            out.append(
                {
                    "deployment": d["id"],
                    "environment": d["environment"],
                    "host": host,
                    "since": iso(d["finished_at"]),
                    "restored_at": iso(restored),
                    "seconds": seconds(end - d["finished_at"]),
                    "open": restored is None,
                }
            )
    return out


def release_figures(
    deployments: list[dict[str, Any]],
    period: Period,
    now: datetime,
    environment: str | None = None,
) -> dict[str, Any]:
    mine = [d for d in deployments if d["started_at"] in period and in_env(d, environment)]
    deps = forward(mine)
    backouts = [d for d in mine if d["strategy"] == "backout"]
    per: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(Counter))
    for d in deps:
        per[d["environment"]][d["release"]][d["status"]] += 1
    per_env = {
        env: {rel: {"deployments": sum(c.values()), **dict(c)} for rel, c in sorted(r.items())}
        for env, r in sorted(per.items())
    }
    waves = [w for d in deps for w in d["waves"] if w["started_at"] is not None]
    switched = sum(len(switched_hosts(d)) for d in deps)
    failed_ms = [
        {
            "deployment": d["id"],
            "environment": d["environment"],
            "release": d["release"],
            "wave": w["index"],
            "failed_hosts": w["failed"],
            "reason": w["reason"],
        }
        for d in deps
        for w in d["waves"]
        if w["status"] == "failed"
    ]
    backout_times = [(d["id"], t) for d in mine if (t := backout_seconds(d)) is not None]
    stuck = [r for r in restorations(deployments, now) if in_env(r, environment)]
    stuck = [r for r in stuck if any(d["id"] == r["deployment"] for d in deps)]
    mtrs = durations(
        [r["seconds"] for r in stuck if not r["open"]],
        "per host left needing remediation: restoration (a later succeeded manual backout "
        "of that deployment, or a later succeeded deployment to the host) − the failed "
        "deployment's finish; open ones are listed, not averaged",
    )
    return {
        "deployments": figure(
            len(deps),
            "deployments started in the period (manual backouts counted apart)",
            "deployments",
            by_status=dict(Counter(d["status"] for d in deps)),
        ),
        "per_environment": figure(
            per_env, "deployments per environment and release, by final status", "deployments"
        ),
        "waves": figure(len(waves), "waves of those deployments that started", "waves"),
        "hosts_changed": figure(
            switched,
            "host switches: hosts whose activate step finished ok, summed over deployments "
            "(a host switched and later backed out counts once)",
            "hosts",
        ),
        "milestones_failed": figure(
            len(failed_ms), "waves whose milestone verdict failed", "milestones", where=failed_ms
        ),
        "manual_backouts": figure(
            len(backouts), "ferry remediate backout runs started in the period", "deployments"
        ),
        "backout_duration": {
            **durations(
                [t for _i, t in backout_times],
                "automatic backout: last backout step's end (revert/reactivate/restore/"
                "recheck) − the failed milestone's verdict; manual backout: its finish − its "
                "start",
            ),
            "deployments": [i for i, _t in backout_times],
        },
        "needs_remediation": figure(
            len(stuck),
            "hosts left needing remediation by the period's deployments (open: not yet restored)",
            "hosts",
            hosts=stuck,
            open=sum(r["open"] for r in stuck),
        ),
        "mtrs": mtrs,
    }
