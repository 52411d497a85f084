"""Acceptance tests of a deployment: run them, judge them (service validation and testing).

A plan's `acceptance:` tests (functional, performance, security, operational,
user-acceptance; each a command, an HTTP status or a port, rendered per host by the
planner) run on every host after the last milestone passed, and on the pilot wave's hosts
after the pilot's milestone. They go through the milestone check machinery (`HostOps.check`
over the host's agent session); each result, with its output and duration, is evidence on
the release for the environment (orchestrator/cms/evidence.py). `acceptance_verdict` is
pure: one failed test on one host fails it, and the deployment is backed out like a failed
milestone (exit 4).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import StepFailed, TransportError
from orchestrator.milestone import Verdict
from orchestrator.rollout import HostAction
from orchestrator.sessions import HostSessions


@dataclass(frozen=True)
class AcceptanceResult:
    host: str
    name: str
    type: str
    passed: bool
    output: str
    duration: float  # seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "name": self.name,
            "type": self.type,
            "passed": self.passed,
            "output": self.output[-1000:],
            "duration": round(self.duration, 3),
        }


def run_acceptance(
    sessions: HostSessions, hosts: Sequence[HostAction], concurrency: int
) -> list[AcceptanceResult]:
    """Every acceptance test on every host (tests in the plan's order on one host; hosts
    in parallel). An unreachable host fails each of its tests, with the reason."""

    def one(action: HostAction) -> list[AcceptanceResult]:
        out: list[AcceptanceResult] = []
        for test in action.acceptance:
            started = time.monotonic()
            try:
                ok, evidence = sessions.ops(action).check(test)
            except (StepFailed, TransportError) as exc:
                ok, evidence = False, f"{test.label}: {exc.message}"
            took = time.monotonic() - started
            out.append(
                AcceptanceResult(
                    action.host, test.label, test.type or "functional", ok, evidence, took
                )
            )
        return out

    todo = [a for a in hosts if a.acceptance]
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(concurrency, len(todo)))) as pool:
        return [r for rs in pool.map(one, todo) for r in rs]


def acceptance_verdict(wave: int, results: Sequence[AcceptanceResult]) -> Verdict:
    """Passed when every test passed on every host (no result: nothing to judge, passed)."""
    failed = [r for r in results if not r.passed]
    hosts = tuple(dict.fromkeys(r.host for r in failed))
    if failed:
        first = failed[0]
        names = ", ".join(sorted({r.name for r in failed}))
        reason = (
            f"acceptance tests failed: {names} ({len(failed)} of {len(results)} results); "
            f"first: {first.host}: {first.output.strip()[:200]}"
        )
        return Verdict(False, wave, hosts, 0, reason, tuple(r.to_dict() for r in failed))
    tests = len({r.name for r in results})
    return Verdict(
        True,
        wave,
        (),
        0,
        f"{tests} acceptance test(s) passed on {len({r.host for r in results})} host(s)",
    )
