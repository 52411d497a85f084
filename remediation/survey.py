"""Survey the hosts a deployment touched and carry out their remediation (Act).

Shared by `ferry remediate backout` and `ferry remediate recover`: both ask every host the
deployment touched what `current` is, decide with `remediation.decisions`, and run the one
backout runner (journaled, the recorded backout commands) on the hosts that need it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.backout_runner import BackoutRunner
from orchestrator.rollout import Baseline, Rollout
from orchestrator.sessions import HostSessions
from remediation import recorded
from remediation.decisions import NEEDS_WORK, HostPlan, plan_hosts

Progress = Callable[[str], None]


@dataclass
class Outcome:
    """What a remediation command reports: its exit code and its JSON object."""

    exit_code: int
    data: dict[str, Any]


@dataclass
class HostResult:
    host: str
    verdict: str
    restored: bool
    prior: Baseline | None
    current: str | None
    steps: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "verdict": self.verdict,
            "restored": self.restored,
            "prior": self.prior.release if self.prior else None,
            "current": self.current,
            "steps": list(self.steps),
            "warnings": self.warnings,
            "error": self.error,
        }


def survey(
    sessions: HostSessions,
    rollout: Rollout,
    journal: Mapping[str, Mapping[str, str]],
    *,
    keep_data: bool = False,
) -> list[HostPlan]:
    """Ask every journaled host its `current` and decide what each one needs."""
    by_host = {a.host: a for a in rollout.hosts()}
    actions = [by_host[h] for h in journal if h in by_host]
    currents = recorded.current_of(sessions, actions, rollout.concurrency)
    priors = {h: by_host[h].prior for h in journal if h in by_host}
    known = {h: s for h, s in journal.items() if h in by_host}
    return plan_hosts(known, priors, currents, rollout.release_id, keep_data=keep_data)


def carry_out(runner: BackoutRunner, plans: list[HostPlan], progress: Progress) -> list[HostResult]:
    work = [p for p in plans if p.verdict in NEEDS_WORK]
    if work:
        progress(
            f"backing out {len(work)} host(s) to their own prior baselines: "
            + ", ".join(p.host for p in work[:10])
            + (" …" if len(work) > 10 else "")
        )
    done = {r.host: r for r in runner.run([p.action() for p in work])}
    results = []
    for p in plans:
        if p.verdict in NEEDS_WORK:
            r = done[p.host]
            res = HostResult(
                p.host, p.verdict, r.restored, p.prior, r.current, p.steps, r.warnings, r.error
            )
        else:
            ok = p.verdict == "at-prior"
            res = HostResult(
                p.host, p.verdict, ok, p.prior, p.current, error=None if ok else p.note
            )
            tell(res, progress)
        results.append(res)
    return results


def tell(r: HostResult, progress: Progress) -> None:
    prior = r.prior.release if r.prior else "no release"
    if r.restored:
        how = "already on" if r.verdict == "at-prior" else "restored to"
        extra = f" (warnings: {'; '.join(r.warnings)})" if r.warnings else ""
        progress(f"  ↩ {r.host}: {how} {prior}{extra}")
    else:
        progress(f"  ✗ {r.host}: NOT restored ({r.verdict}): {r.error or 'read-back differs'}")


def needs_remediation(results: list[HostResult]) -> list[dict[str, Any]]:
    """The evidence shape DeploymentRun uses: host, current, error, prior (the release a
    backout RFC must be for)."""
    return [
        {
            "host": r.host,
            "current": r.current,
            "error": r.error or r.verdict,
            "prior": r.prior.release if r.prior else None,
        }
        for r in results
        if not r.restored
    ]
