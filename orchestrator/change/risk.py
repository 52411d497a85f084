"""The risk model: a score from five factors, turned into low/medium/high. Pure.

Documented in docs/change.md. Each factor gives points (weights in change_models.yaml
`risk:`); the sum is the score. The factors are kept with the result so that anyone can see
*why* a change is high risk, and an override (with its mandatory reason) never hides them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from orchestrator.change.models import RiskWeights

MB = 1024 * 1024


@dataclass(frozen=True)
class RiskInputs:
    """What the score is computed from; the CMS side gathers these."""

    environment: str
    criticality: str
    model: str
    host_count: int | None = None  # None: the whole environment, or patterns of unknown size
    release_size: int | None = None  # package bytes, when the release is in the DML
    recent_failures: int = 0  # failed or backed-out deployments here in the last 30 days


@dataclass(frozen=True)
class Factor:
    name: str
    value: Any
    points: int
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {"factor": self.name, "value": self.value, "points": self.points, "why": self.why}


@dataclass(frozen=True)
class RiskAssessment:
    level: str
    score: int
    computed_level: str
    factors: tuple[Factor, ...] = field(default_factory=tuple)
    override_reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "score": self.score,
            "computed_level": self.computed_level,
            "overridden": self.override_reason is not None,
            "override_reason": self.override_reason,
            "factors": [f.to_dict() for f in self.factors],
        }


def _host_points(count: int | None, w: RiskWeights) -> tuple[int, str]:
    if count is None:
        return w.hosts_many_points, "the whole environment (or host patterns) may change"
    if count <= 1:
        return 0, f"{count} host"
    if count <= w.hosts_few:
        return 1, f"{count} hosts (up to {w.hosts_few}: a few)"
    return w.hosts_many_points, f"{count} hosts (more than {w.hosts_few})"


def _size_points(size: int | None, w: RiskWeights) -> tuple[int, str]:
    if size is None:
        return 0, "release size unknown (not yet in the DML)"
    mb = size / MB
    if mb > w.release_large_mb:
        return 2, f"{mb:.1f} MB package (over {w.release_large_mb:g} MB)"
    if mb > w.release_medium_mb:
        return 1, f"{mb:.1f} MB package (over {w.release_medium_mb:g} MB)"
    return 0, f"{mb:.1f} MB package"


def level_for(score: int, w: RiskWeights) -> str:
    if score <= w.low_max:
        return "low"
    return "medium" if score <= w.medium_max else "high"


def assess(inputs: RiskInputs, weights: RiskWeights) -> RiskAssessment:
    """Score the change; every factor's points and reason are kept in the result."""
    crit = weights.criticality.get(inputs.criticality, weights.criticality["high"])  # type: ignore[call-overload]
    model = weights.model.get(inputs.model, 0)  # type: ignore[call-overload]
    host_pts, host_why = _host_points(inputs.host_count, weights)
    size_pts, size_why = _size_points(inputs.release_size, weights)
    fail_pts = min(inputs.recent_failures * weights.failure_points, weights.failure_cap)
    factors = (
        Factor(
            "environment_criticality",
            inputs.criticality,
            crit,
            f"{inputs.environment} is {inputs.criticality} criticality",
        ),
        Factor("hosts", inputs.host_count, host_pts, host_why),
        Factor("change_model", inputs.model, model, f"{inputs.model} change"),
        Factor("release_size", inputs.release_size, size_pts, size_why),
        Factor(
            "recent_failures",
            inputs.recent_failures,
            fail_pts,
            f"{inputs.recent_failures} failed or backed-out deployment(s) to "
            f"{inputs.environment} in the last 30 days",
        ),
    )
    score = sum(f.points for f in factors)
    level = level_for(score, weights)
    return RiskAssessment(level=level, score=score, computed_level=level, factors=factors)


def override(assessment: RiskAssessment, level: str, reason: str) -> RiskAssessment:
    """A person's judgement replaces the level; the computed score and factors stay on record."""
    if not reason.strip():
        raise ValueError("overriding the risk needs a reason")
    return replace(assessment, level=level, override_reason=reason.strip())
