"""The pull method's wave driver (Orchestrate): desired state in, agents' reports out.

A wave of a `method: pull` deployment does not dial its hosts. It writes each host's desired
state in the CMS (the release, and every step the planner rendered for that host, in the
step table's order), and `ferry dml serve` answers the hosts' agents' long-polls with it.
Each agent fetches, verifies, runs the steps and reports each result; this driver reads the
reports, journals them as the host's steps (so status, backout and recover read the same
journal as for push) and, when every host has its outcome or the milestone's deadline
passes, gives the wave's outcomes to the same milestone verdict as push. A host whose agent
said nothing by the deadline fails; its heartbeat says whether the agent is silent (down,
unreachable) or alive and still working. A host whose own time has not come (`apply: boot`
or `window`) is pending: it is not counted, and it converges when it applies.

Backout is desired state too: every touched host is pointed back at its prior baseline with
the backout steps of the prior release, and the driver waits for the agents to report it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator import pullstate
from orchestrator.backout import BackoutAction
from orchestrator.backout_runner import BACKOUT_WAVE, BackoutResult
from orchestrator.cms.deployments import DeploymentRecord
from orchestrator.context import hook_env
from orchestrator.milestone import HostOutcome
from orchestrator.pullwindow import agent_window
from orchestrator.rollout import HostAction, RenderedCheck, Rollout, WavePlan, _check_record
from orchestrator.steps import STEPS

Progress = Callable[[str], None]
FINAL = ("done", "refused")
TICK = 0.5


@dataclass
class HostProgress:
    """What one host's agent reported for the generation it was given."""

    generation: int
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    failed: tuple[str, dict[str, Any]] | None = None
    done: dict[str, Any] | None = None
    pending: bool = False
    open_step: int | None = None  # the journal row begun for the next step

    @property
    def final(self) -> bool:
        return self.done is not None or self.failed is not None


def _checks(checks: tuple[RenderedCheck, ...]) -> list[dict[str, Any]]:
    return [_check_record(c) for c in checks]


def forward_spec(rollout: Rollout, a: HostAction) -> dict[str, Any]:
    """The host's rendered forward steps as its agent runs them (the planner's, in order)."""
    actions: list[dict[str, Any]] = []
    for step in a.steps:
        command = a.forward.get(step)
        item: dict[str, Any] = {"step": step}
        if command is not None and command.command:
            item["run"] = command.command
        if step == "install" and command is not None and command.config:
            item["config"] = dict(command.config)
        if step == "activate":
            item["switch"] = rollout.release_id
        actions.append(item)
    if a.checks:
        actions.append({"step": "milestone", "checks": _checks(a.checks)})
    spec: dict[str, Any] = {
        "actions": actions,
        "env": hook_env(a.context),
        "cwd": a.context.get("release_path"),
        "timeout": rollout.timeouts.step,
        "full": rollout.full_readback,
    }
    if a.window:  # apply: window: the host's own window, from the inventory (or the default)
        spec["window"] = agent_window(a.window)
    return spec


def backout_spec(rollout: Rollout, a: HostAction, b: BackoutAction) -> dict[str, Any]:
    """Back to the prior baseline: the prior's own backout hooks and checks (push's steps);
    only a failed revert stops a host, as with push."""
    prior = b.prior.release_id if b.prior else None
    actions: list[dict[str, Any]] = []
    if prior is not None:
        actions += [{"step": "stage"}, {"step": "verify"}]
    for step in b.steps:
        command = a.backout.get(step)
        item: dict[str, Any] = {"step": step}
        if step == "revert":
            item["switch"] = prior
        else:
            item["warn_only"] = True
        if command is not None and command.command:
            item["run"] = command.command
        if step == "recheck" and command is not None and command.checks:
            item["checks"] = _checks(command.checks)
        actions.append(item)
    return {
        "actions": actions,
        "env": hook_env(a.backout_context),
        "cwd": a.backout_context.get("release_path"),
        "timeout": rollout.timeouts.step,
        "full": rollout.full_readback,
        "leaving": rollout.release_id,
    }


class PullDriver:
    def __init__(
        self, url: str, deployment_id: int, rollout: Rollout, record: DeploymentRecord,
        progress: Progress, stop: Any,
    ) -> None:  # fmt: skip
        self.url = url
        self.id = deployment_id
        self.rollout = rollout
        self.record = record
        self.progress = progress
        self.stop = stop
        self.finals: dict[str, dict[str, Any]] = {}  # host → its last "done" report
        self.pending: set[str] = set()

    @property
    def apply(self) -> str:
        return str((self.rollout.pull or {}).get("apply", "now"))

    @property
    def heartbeat(self) -> float:
        return float((self.rollout.pull or {}).get("heartbeat", 10.0))

    # -- a wave ----------------------------------------------------------------------------
    def run_wave(self, wave: WavePlan) -> tuple[list[HostOutcome], float]:
        """Point the wave's hosts at the release; their outcomes, and the time it took
        (never more than the milestone's deadline: a host late past it is a failed host)."""
        started = time.monotonic()
        rows = []
        for a in wave.hosts:
            rows.append(
                {
                    "host": a.host,
                    "deployment_id": self.id,
                    "purpose": "deploy",
                    "release": self.rollout.release,
                    "digest": self.rollout.digest,
                    "release_id": self.rollout.release_id,
                    "apply": self.apply,
                    "spec": forward_spec(self.rollout, a),
                }
            )
        progress = self._begin(wave.index, [a.host for a in wave.hosts], rows)
        deadline = started + self.rollout.milestone.deadline
        self._wait(wave.index, progress, deadline, count_pending=True)
        outcomes = []
        for a in wave.hosts:
            p = progress[a.host]
            if p.pending and not p.final:
                self.pending.add(a.host)
                continue
            outcome = self._outcome(a.host, p)
            if p.open_step is not None:  # begun before its desired state; never reported
                self.record.end(p.open_step, "failed", {"error": outcome.reason})
            outcomes.append(outcome)
        if self.pending:
            self.record.append_evidence(
                "pending", [{"host": h, "apply": self.apply} for h in sorted(self.pending)]
            )
            self.progress(
                f"  {len(self.pending)} host(s) pending (apply: {self.apply}): "
                + ", ".join(sorted(self.pending))
            )
        elapsed = min(time.monotonic() - started, self.rollout.milestone.deadline)
        return outcomes, elapsed

    def _begin(
        self, wave: int, hosts: list[str], rows: list[dict[str, Any]]
    ) -> dict[str, HostProgress]:
        # records before actions: each host's first step is journaled before its agent can
        # see the desired state that starts it
        first = {r["host"]: (r["spec"]["actions"] or [{"step": "stage"}])[0]["step"] for r in rows}
        opened = {h: self.record.begin(wave, h, first[h]) for h in hosts if first[h] in STEPS}
        gens = pullstate.set_desired(self.url, self.rollout.environment, rows)
        return {h: HostProgress(gens[h], open_step=opened.get(h)) for h in hosts}

    def _wait(
        self, wave: int, progress: dict[str, HostProgress], deadline: float, count_pending: bool
    ) -> None:
        after = 0
        hosts = list(progress)
        while True:
            for r in pullstate.reports(self.url, hosts, after):
                after = r.id
                p = progress[r.host]
                if r.generation != p.generation or p.final:
                    continue
                self._journal(wave, r, p)
            waiting = [h for h, p in progress.items() if not p.final and not p.pending]
            if not waiting or self.stop.is_set() or time.monotonic() >= deadline:
                return
            time.sleep(TICK)

    def _journal(self, wave: int, r: pullstate.Report, p: HostProgress) -> None:
        if r.step == "pending":
            p.pending = True
            return
        p.pending = False
        if r.step in STEPS:
            sid = (
                p.open_step if p.open_step is not None else self.record.begin(wave, r.host, r.step)
            )
            p.open_step = None
            self.record.end(sid, "succeeded" if r.ok else "failed", _safe(r.detail))
        p.steps[r.step] = {"ok": r.ok, **r.detail}
        if r.step == "done":
            if r.ok:
                p.done = r.detail
                self.finals[r.host] = r.detail
            else:
                p.failed = ("readback", r.detail)
        elif not r.ok and not (r.detail.get("warn_only") or _warn_only(r.step)):
            p.failed = (r.step, r.detail)

    def _outcome(self, host: str, p: HostProgress) -> HostOutcome:
        activated = "activate" in p.steps
        if p.done is not None:
            return HostOutcome(host, True, activated=activated)
        if p.failed is not None:
            step, detail = p.failed
            if step == "readback":
                why = "; ".join(detail.get("mismatches") or []) or (
                    f"read back on {detail.get('current')}, not {self.rollout.release_id}"
                )
                return HostOutcome(host, False, "readback", why, "", activated, "integrity")
            kind = detail.get("kind")
            return HostOutcome(
                host, False, "check" if step == "milestone" else step,
                str(detail.get("error") or detail.get("reason") or "failed"),
                str(detail.get("output") or ""), activated,
                kind=kind if kind in ("integrity", "disk-full") else None,
            )  # fmt: skip
        return HostOutcome(host, False, "report", self._silence(host), "", activated, "unreachable")

    def _silence(self, host: str) -> str:
        """No outcome by the deadline: a silent agent, or an alive one that did not finish?"""
        st = pullstate.status(self.url, [host])[0]
        age = st["heartbeat_age_s"]
        if age is None:
            return "no report by the milestone's deadline; its agent never sent a heartbeat"
        if age > 3 * self.heartbeat:
            return (
                f"no report by the milestone's deadline; its agent is silent (last heartbeat "
                f"{age:.0f}s ago): the host is down or cannot reach the DML server"
            )
        return (
            f"no report by the milestone's deadline; its agent is alive (heartbeat {age:.0f}s "
            "ago) but did not finish"
        )

    def current(self, hosts: list[HostAction]) -> dict[str, str | Exception]:
        """What each host's agent read back at the end of its steps."""
        out: dict[str, str | Exception] = {}
        for a in hosts:
            got = self.finals.get(a.host)
            out[a.host] = (
                str(got.get("current"))
                if got and got.get("current")
                else RuntimeError("its agent reported no read-back")
            )
        return out

    # -- backout ---------------------------------------------------------------------------
    def back_out(self, actions: list[BackoutAction], everyone: bool) -> list[BackoutResult]:
        """Point each host back at its prior baseline; wait for the agents to report it.
        With `everyone` (the deployment's own backout), hosts never touched that still
        desire this release (down, pending) are pointed back too: they converge to the
        baseline in force when they return, without being waited for."""
        by_host = {a.host: a for a in self.rollout.hosts()}
        rows = [self._backout_row(by_host[b.host], b) for b in actions]
        if everyone:
            touched = {b.host for b in actions}
            mine = pullstate.desired_all(self.url, list(by_host))
            for name, d in mine.items():
                if name in touched or d.deployment_id != self.id or d.purpose != "deploy":
                    continue
                prior = by_host[name].prior
                rows.append(
                    self._backout_row(by_host[name], BackoutAction(name, prior, ("revert",)))
                )
                self.progress(f"  {name}: pointed back at its prior baseline (not waited for)")
        if not rows:
            return []
        progress = self._begin(BACKOUT_WAVE, [b.host for b in actions], rows[: len(actions)])
        if len(rows) > len(actions):
            pullstate.set_desired(self.url, self.rollout.environment, rows[len(actions) :])
        self.finals.clear()
        deadline = time.monotonic() + self.rollout.milestone.deadline
        self._wait(BACKOUT_WAVE, progress, deadline, count_pending=False)
        results = []
        for b in actions:
            p = progress[b.host]
            prior = b.prior.release_id if b.prior else None
            r = BackoutResult(b.host, False)
            warnings = [
                f"{s}: {d.get('error')}"
                for s, d in p.steps.items()
                if not d.get("ok") and s != "done"
            ]
            r.warnings = [w for w in warnings if not w.startswith("revert")]
            if p.done is not None:
                r.current = p.done.get("current")
                r.restored = r.current == prior
                if not r.restored:
                    r.error = f"read back on {r.current}, not {prior}"
            elif p.failed is not None:
                r.error = f"{p.failed[0]}: {p.failed[1].get('error')}"
                r.current = p.failed[1].get("current")
            else:
                r.error = self._silence(b.host)
            if p.open_step is not None:
                self.record.end(p.open_step, "failed", {"error": r.error})
            results.append(r)
            mark = "↩" if r.restored else "✗"
            what = f"restored to {r.current}" if r.restored else f"NOT restored: {r.error}"
            self.progress(f"  {mark} {r.host}: {what}")
        return results

    def _backout_row(self, a: HostAction, b: BackoutAction) -> dict[str, Any]:
        return {
            "host": a.host,
            "deployment_id": self.id,
            "purpose": "backout",
            "release": b.prior.release if b.prior else None,
            "digest": b.prior.digest if b.prior else None,
            "release_id": b.prior.release_id if b.prior else None,
            "apply": "now",
            "spec": backout_spec(self.rollout, a, b),
        }


def _warn_only(step: str) -> bool:
    # backout hooks of the prior release warn; only a failed revert stops a host
    return step in ("reactivate", "restore", "recheck")


def _safe(detail: dict[str, Any]) -> dict[str, Any]:
    return {k: (v[-2000:] if isinstance(v, str) else v) for k, v in detail.items()}
