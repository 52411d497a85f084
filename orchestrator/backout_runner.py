"""The one backout runner (Act): automatic backout, `ferry remediate backout` and `recover`.

Given each host's BackoutAction (what `orchestrator.backout` or the remediation decisions
chose), it runs the steps the step table names, with the commands the planner rendered for
that host's own prior release (`HostAction.backout`), journals every step before and after
it acts, and reads the host back. A failing hook of the old release is a warning, never a
trap: only a failed `revert` stops a host. The result says whether the host is on its prior.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from orchestrator import steps as step_table
from orchestrator.backout import BackoutAction
from orchestrator.cms.deployments import DeploymentRecord
from orchestrator.errors import StepFailed, TransportError
from orchestrator.executor import run_hook
from orchestrator.hostops import HostOps
from orchestrator.rollout import HostAction, Rollout, StepCommand
from orchestrator.sessions import HostSessions

Progress = Callable[[str], None]
BACKOUT_WAVE = -1  # the journal's wave index for backout steps


@dataclass
class BackoutResult:
    host: str
    restored: bool
    current: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "restored": self.restored,
            "current": self.current,
            "warnings": self.warnings,
            "error": self.error,
        }


class BackoutRunner:
    def __init__(
        self,
        rollout: Rollout,
        sessions: HostSessions,
        record: DeploymentRecord,
        progress: Progress,
    ) -> None:
        self.rollout = rollout
        self.sessions = sessions
        self.record = record
        self.progress = progress
        self._steps: dict[str, Callable[[HostOps, HostAction, StepCommand], dict[str, Any]]]
        self._steps = {
            "revert": self._revert,
            "reactivate": self._hook("reactivate"),
            "restore": self._restore,
            "recheck": self._recheck,
        }
        step_table.dispatch_table(self._steps, "backout")

    def run(self, actions: list[BackoutAction]) -> list[BackoutResult]:
        work = [a for a in actions if a.needed]
        if not work:
            return []
        by_host = {a.host: a for a in self.rollout.hosts()}
        workers = max(1, min(self.rollout.concurrency, len(work)))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(lambda a: self._host(a, by_host[a.host]), work))
        for r in results:
            mark = "↩" if r.restored else "✗"
            extra = f" (warnings: {'; '.join(r.warnings)})" if r.warnings else ""
            where = r.current or "no release (current removed: it had no prior)"
            what = f"restored to {where}" if r.restored else f"NOT restored: {r.error}"
            self.progress(f"  {mark} {r.host}: {what}{extra}")
        return results

    def _host(self, action: BackoutAction, host: HostAction) -> BackoutResult:
        prior_id = action.prior.release_id if action.prior else None
        result = BackoutResult(host.host, False)
        try:
            ops = self.sessions.ops(host)
            for step in action.steps:
                command = host.backout.get(step, StepCommand())
                sid = self.record.begin(BACKOUT_WAVE, host.host, step)
                try:
                    detail = self._steps[step](ops, host, command)
                    self.record.end(sid, "succeeded", detail)
                except StepFailed as exc:
                    self.record.end(
                        sid, "failed", {"error": exc.message, "output": exc.output[-1000:]}
                    )
                    if step == "revert":
                        raise
                    result.warnings.append(f"{step}: {exc.message}")
                except TransportError as exc:
                    self.record.end(sid, "failed", {"error": exc.message})
                    raise
            back = ops.readback(
                prior_id,
                self.rollout.full_readback,
                digest=action.prior.digest if action.prior else None,
            )
            result.current = back.get("current")
            result.restored = bool(back.get("ok")) and back.get("current") == prior_id
            if not result.restored:
                result.error = "; ".join(back.get("mismatches", [])[:3]) or "read-back differs"
        except (StepFailed, TransportError) as exc:
            result.error = exc.reason  # printed and recorded beside the host's name
        return result

    def _revert(self, ops: HostOps, host: HostAction, _: StepCommand) -> dict[str, Any]:
        detail = ops.switch(host.prior.release_id if host.prior else None, step="revert")
        if self.rollout.containers:
            from orchestrator import containers

            detail.update(containers.revert(ops, self.rollout))
        return detail

    def _restore(self, ops: HostOps, host: HostAction, command: StepCommand) -> dict[str, Any]:
        if not self.rollout.containers:
            return run_hook(ops, "restore", command.command, host.backout_context)
        from orchestrator import containers

        # the data goes back with the containers stopped, and they start on it afterwards
        containers.set_state(ops, self.rollout, "stop")
        try:
            return run_hook(ops, "restore", command.command, host.backout_context)
        finally:
            containers.set_state(ops, self.rollout, "start")

    def _hook(self, step: str) -> Callable[[HostOps, HostAction, StepCommand], dict[str, Any]]:
        def run(ops: HostOps, host: HostAction, command: StepCommand) -> dict[str, Any]:
            return run_hook(ops, step, command.command, host.backout_context)

        return run

    def _recheck(self, ops: HostOps, host: HostAction, command: StepCommand) -> dict[str, Any]:
        evidence = []
        if command.command is not None:
            run_hook(ops, "recheck", command.command, host.backout_context)
            evidence.append("check hook passed")
        for check in command.checks:
            ok, ev = ops.check(check)
            if not ok:
                raise StepFailed(ops.name, "recheck", f"prior release check failed: {ev}")
            evidence.append(ev)
        return {"checks": evidence}
