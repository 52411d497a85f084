"""Service validation KPIs (pure): escaped defects and test pass rate per test type.

For the insight report (orchestrator/insight/, issue 16), which reads the facts with
`orchestrator.cms.evidence.facts(session)` and calls these functions:

- an **escaped defect** is a release package backed out in an environment after the same
  package (digest) had passed its acceptance tests in an earlier one: the tests let the
  defect through;
- the **test pass rate** of a type (functional, performance, security, operational,
  user-acceptance) is passed results over all results of that type.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

TEST_TYPES = ("functional", "performance", "security", "operational", "user-acceptance")
BACKED_OUT = frozenset({"backed-out", "failed"})  # failed: the backout left hosts to remediate


@dataclass(frozen=True)
class DeploymentFact:
    id: int
    release: str
    digest: str
    environment: str
    status: str
    at: datetime  # when it ended (or started, while open)


@dataclass(frozen=True)
class AcceptanceFact:
    deployment_id: int | None
    release: str
    digest: str
    environment: str
    name: str
    type: str
    passed: bool
    at: datetime


@dataclass(frozen=True)
class EscapedDefect:
    release: str
    digest: str
    environment: str  # where it was backed out
    deployment_id: int
    passed_in: tuple[str, ...]  # the earlier environments whose acceptance it passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "release": self.release,
            "digest": self.digest,
            "environment": self.environment,
            "deployment": self.deployment_id,
            "passed_acceptance_in": list(self.passed_in),
        }


@dataclass(frozen=True)
class PassRate:
    type: str
    passed: int
    total: int

    @property
    def rate(self) -> float | None:
        return self.passed / self.total if self.total else None

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "passed": self.passed, "total": self.total, "rate": self.rate}


def _passed_deployments(results: list[AcceptanceFact]) -> dict[int, tuple[AcceptanceFact, ...]]:
    """deployment id → its acceptance results, for deployments where every result passed."""
    by_dep: dict[int, list[AcceptanceFact]] = defaultdict(list)
    for r in results:
        if r.deployment_id is not None:
            by_dep[r.deployment_id].append(r)
    return {d: tuple(rs) for d, rs in by_dep.items() if rs and all(r.passed for r in rs)}


def escaped_defects(
    deployments: list[DeploymentFact], results: list[AcceptanceFact]
) -> list[EscapedDefect]:
    """Each backed-out deployment whose package had passed acceptance, earlier, elsewhere."""
    passed = _passed_deployments(results)
    out: list[EscapedDefect] = []
    for d in sorted(deployments, key=lambda d: d.id):
        if d.status not in BACKED_OUT:
            continue
        earlier = sorted(
            {
                rs[0].environment
                for rs in passed.values()
                if rs[0].digest == d.digest
                and rs[0].environment != d.environment
                and max(r.at for r in rs) <= d.at
            }
        )
        if earlier:
            out.append(EscapedDefect(d.release, d.digest, d.environment, d.id, tuple(earlier)))
    return out


def pass_rates(results: list[AcceptanceFact]) -> dict[str, PassRate]:
    """Test type → passed over total results (every type listed, empty ones with total 0)."""
    passed: dict[str, int] = dict.fromkeys(TEST_TYPES, 0)
    total: dict[str, int] = dict.fromkeys(TEST_TYPES, 0)
    for r in results:
        total[r.type] = total.get(r.type, 0) + 1
        passed[r.type] = passed.get(r.type, 0) + int(r.passed)
    return {t: PassRate(t, passed.get(t, 0), total[t]) for t in total}
