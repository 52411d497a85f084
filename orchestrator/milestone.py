"""Milestone verdicts (pure): did a wave pass, given each host's outcome and the criteria?

One documented meaning of "tolerated failures": `max_failed: N` lets a wave pass with up
to N failed hosts; the milestone fails when failures EXCEED N (N+1 fails, N passes).
A percentage is of the wave's hosts, rounded down (`10%` of 12 hosts tolerates 1).
A host fails when any step or check fails, or when it cannot be reached. A missed deadline
fails the milestone whatever the counts, and so does an integrity failure on any host (it
refused the signature, the pinned key or a checksum): that is never tolerated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.plan import Milestone


@dataclass(frozen=True)
class HostOutcome:
    host: str
    ok: bool
    failed_step: str | None = None
    reason: str = ""
    output: str = ""
    activated: bool = False
    kind: str | None = None  # the error's kind: integrity, unreachable, disk-full, …

    @property
    def integrity(self) -> bool:
        return not self.ok and self.kind == "integrity"

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "ok": self.ok,
            "failed_step": self.failed_step,
            "reason": self.reason,
            "kind": self.kind,
            "output": self.output[-1000:],
        }


@dataclass(frozen=True)
class Verdict:
    passed: bool
    wave: int
    failed: tuple[str, ...]
    allowed: int
    reason: str
    evidence: tuple[dict[str, Any], ...] = field(default=())
    integrity: bool = False  # some host refused what it was sent

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "wave": self.wave,
            "failed": list(self.failed),
            "allowed_failures": self.allowed,
            "reason": self.reason,
            "integrity": self.integrity,
            "evidence": list(self.evidence),
        }


def milestone_verdict(
    wave: int,
    outcomes: list[HostOutcome],
    criteria: Milestone,
    *,
    elapsed: float,
    interrupted: bool = False,
) -> Verdict:
    failed = [o for o in outcomes if not o.ok]
    allowed = criteria.allowed_failures(len(outcomes))
    evidence = tuple(o.to_dict() for o in failed)
    names = tuple(o.host for o in failed)
    if interrupted:
        return Verdict(False, wave, names, allowed, "interrupted by a signal", evidence)
    refused = [o for o in failed if o.integrity]
    if refused:
        first = refused[0]
        reason = (
            f"integrity failure on {len(refused)} host(s), never tolerated; first: "
            f"{first.host} at {first.failed_step}: {first.reason}"
        )
        return Verdict(False, wave, names, allowed, reason, evidence, integrity=True)
    if elapsed > criteria.deadline:
        reason = f"deadline of {criteria.deadline:.0f}s passed ({elapsed:.1f}s)"
        return Verdict(False, wave, names, allowed, reason, evidence)
    if len(failed) > allowed:
        first = failed[0]
        reason = (
            f"{len(failed)} of {len(outcomes)} hosts failed (tolerated: {allowed}); first: "
            f"{first.host} at {first.failed_step}: {first.reason}"
        )
        return Verdict(False, wave, names, allowed, reason, evidence)
    reason = f"{len(outcomes) - len(failed)} of {len(outcomes)} hosts healthy"
    if failed:
        reason += f"; {len(failed)} failed within the tolerance of {allowed}"
    return Verdict(True, wave, names, allowed, reason, evidence)


def approver_refused(approver: str, deployer: str, roles: dict[str, list[str]]) -> str | None:
    """Why `approver` may not decide a manual milestone, or None when they may: they must
    hold a role in the change models (people Ferry knows as approvers) and, separation of
    duties, not be the person who started the deployment."""
    if not approver.strip():
        return "the decision names no approver"
    if approver == deployer:
        return f"{approver} started this deployment and may not approve its milestone"
    if not roles.get(approver):
        return f"{approver} holds no role in the change models (roles:)"
    return None
