"""Early life support (ITIL release closure), the decisions (pure).

A plan's `els: {period, every, checks}` is rendered per host when the deployment is
planned (`els_record`) and kept in the deployment's evidence, so `ferry els run` never
re-reads the plan. Once the deployment has succeeded, each `ferry els run` asks `next_action`:

    run     inside the period and the last run is `every` old (or there is none)
    wait    inside the period, run too recently
    close   the period is over (or the deployment no longer stands): record the outcome
    done    the outcome is recorded

The outcome (`outcome_of`): `failed` if any run had a failed check, `passed` if runs were
made and none failed, `unchecked` if the period passed with no run.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

from orchestrator.plan import DeployPlan
from orchestrator.planner import _HostRenderer
from orchestrator.rollout import RenderedCheck, Rollout, _check_from, _check_record

Action = Literal["run", "wait", "close", "done"]


def els_record(plan: DeployPlan, rollout: Rollout) -> dict[str, Any] | None:
    """The plan's ELS with every check rendered for every host (None: the plan has none)."""
    if plan.els is None:
        return None
    render = _HostRenderer(plan, {}, rollout.plan_file, rollout.release, rollout.release_id)
    checks: dict[str, list[dict[str, Any]]] = {}
    for a in rollout.hosts():
        ctx = render.context(a.as_host(), a.deploy_root, rollout.release, rollout.release_id)
        checks[a.host] = [
            _check_record(render.check(c, ctx, f"els.checks[{i}]", a.host))
            for i, c in enumerate(plan.els.checks)
        ]
    return {"period": plan.els.period, "every": plan.els.every, "checks": checks, "runs": []}


def checks_of(els: dict[str, Any], host: str) -> list[RenderedCheck]:
    return [_check_from(c) for c in els.get("checks", {}).get(host, [])]


def period_end(els: dict[str, Any], succeeded_at: datetime) -> datetime:
    return succeeded_at + timedelta(seconds=float(els["period"]))


def next_action(
    els: dict[str, Any], status: str, finished_at: datetime | None, now: datetime
) -> Action:
    if els.get("outcome"):
        return "done"
    if finished_at is None:
        return "wait"  # still running: the period starts when it succeeds
    if status != "succeeded" or now >= period_end(els, finished_at):
        return "close"
    runs = els.get("runs", [])
    if runs:
        last = datetime.fromisoformat(runs[-1]["at"])
        if now - last < timedelta(seconds=float(els["every"])):
            return "wait"
    return "run"


def outcome_of(els: dict[str, Any]) -> str:
    runs = els.get("runs", [])
    if any(r.get("failed") for r in runs):
        return "failed"
    return "passed" if runs else "unchecked"
