"""A deployment as the CMS recorded it, made ready to act on again (backout, recover).

Remediation runs the recorded rollout: the hosts the deploy dialled (address, port, user,
identity, known_hosts, deploy root), each host's prior with digest, and the backout
commands rendered for that prior when the deployment was planned. It reads neither the
plan file nor the inventory, so a backout at 3 a.m. is the backout the deploy would have
run, even after the plan was edited. Only an explicit `--plan FILE` re-renders the backout
commands (for a plan whose hooks were fixed since); the record keeps that plan's hash.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from orchestrator.cms import deployments
from orchestrator.cms.deployments import RecordedDeployment
from orchestrator.errors import StepFailed, TransportError
from orchestrator.inventory import require_files
from orchestrator.rollout import HostAction, Rollout
from orchestrator.sessions import HostSessions
from orchestrator.steps import BACKOUT_NAMES

Progress = Callable[[str], None]


def journal(url: str, rec: RecordedDeployment) -> dict[str, dict[str, str]]:
    """host → {step: last status}: the deployment's journal, with the backout steps of every
    earlier manual backout of it laid over (so a restore already done is not done twice)."""
    merged = deployments.steps_by_host(url, rec.id)
    for bid in deployments.backouts_of(url, rec.id):
        for host, steps in deployments.steps_by_host(url, bid).items():
            if host in merged:
                merged[host].update({k: v for k, v in steps.items() if k in BACKOUT_NAMES})
    return merged


def rollout_for(rec: RecordedDeployment, plan_override: Path | None, progress: Progress) -> Rollout:
    """The rollout remediation runs: as recorded, or with `--plan FILE`'s backout hooks."""
    rollout = rec.plan()
    where = f"deployment {rec.id}"
    if rollout.ssh is not None:
        require_files(rollout.ssh, where)
    if plan_override is None:
        _note_edited_plan(rec, rollout, progress)
        return rollout
    from orchestrator.plan import load_plan
    from orchestrator.planner import rerender_backout
    from orchestrator.preparation import plan_hash

    plan = load_plan(plan_override)
    templates = {t.dest: t.src.read_text() for t in plan.config}
    fresh = rerender_backout(
        plan,
        rollout,
        templates=templates,
        plan_file=str(plan_override),
        plan_hash=plan_hash(plan_override, templates),
    ).bind(rec.id)
    progress(
        f"using the backout hooks of {plan_override} (given with --plan), not the ones recorded "
        f"for deployment {rec.id}"
    )
    return fresh


def _note_edited_plan(rec: RecordedDeployment, rollout: Rollout, progress: Progress) -> None:
    from orchestrator.errors import FerryError
    from orchestrator.plan import load_plan
    from orchestrator.preparation import plan_hash

    path = Path(rollout.plan_file)
    if not rollout.plan_hash or not path.is_file():
        return
    try:
        plan = load_plan(path)
        now = plan_hash(path, {t.dest: t.src.read_text() for t in plan.config})
    except (FerryError, OSError):
        now = "(no longer loads)"
    if now != rollout.plan_hash:
        progress(
            f"note: {path} changed since deployment {rec.id} was planned; running the backout "
            "recorded then (pass --plan FILE to run that file's hooks instead)"
        )


# -- is anybody still running it? ------------------------------------------------------------
def runner_alive(evidence: dict[str, Any]) -> bool | None:
    """True/False when the deploying process was on this machine; None when we cannot tell."""
    runner = evidence.get("runner") or {}
    pid, host = runner.get("pid"), runner.get("host")
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # the pid may have been reused by another program since
    return b"ferry" in cmdline or b"orchestrator" in cmdline or b"prefect" in cmdline


def current_of(
    sessions: HostSessions, actions: list[HostAction], concurrency: int
) -> dict[str, str | None | Exception]:
    """Ask each host what `current` is (the agent's state); the error when unreachable."""

    def one(a: HostAction) -> tuple[str, str | None | Exception]:
        try:
            return a.host, sessions.ops(a).state().get("current")
        except (StepFailed, TransportError) as exc:
            return a.host, exc

    if not actions:
        return {}
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(actions)))) as pool:
        return dict(pool.map(one, actions))
