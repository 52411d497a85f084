"""Change models (`deploy_plans/change_models.yaml`) and validated RFC input. Pure: no I/O.

The change models say *how much* authorization a change needs: `standard` changes match a
pre-authorized template, `normal` changes need approvals by risk and a lead time, and
`emergency` changes need the ECAB and are reviewed afterwards. Organisations edit the YAML;
these models are where a bad edit is caught, naming the field.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dml.ref import ReleaseRef
from orchestrator.errors import BadInput

Role = Literal["cab", "ecab", "change-manager", "peer"]
ModelName = Literal["standard", "normal", "emergency"]
RiskLevel = Literal["low", "medium", "high"]
StageName = Literal["plan", "checkin", "deploy"]

ROLES: tuple[Role, ...] = ("cab", "ecab", "change-manager", "peer")
RISK_ORDER: dict[str, int] = {"low": 0, "medium": 1, "high": 2}
DEFAULT_STAGES: tuple[str, ...] = ("checkin", "deploy")

_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ApprovalRule(_Strict):
    """`count` distinct approvers other than the requester; one of them in `roles` if given."""

    count: int = Field(1, ge=1, le=10)
    roles: list[Role] = Field(default_factory=list)

    def describe(self) -> str:
        who = f", including one with role {' or '.join(self.roles)}" if self.roles else ""
        return f"{self.count} approval{'s' if self.count > 1 else ''}{who}"


class StandardTemplate(_Strict):
    """A pre-authorized routine change: matching RFCs are authorized when raised."""

    name: str = Field(pattern=rf"^{_NAME}$")
    description: str = ""
    release: str = Field("*", description="fnmatch pattern on the release name")
    environments: list[str] = Field(min_length=1)
    max_risk: RiskLevel = "low"
    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES))

    def mismatches(
        self, release_name: str, environment: str, risk: str, stages: list[str]
    ) -> list[str]:
        """Why an RFC does not fit this template (empty: it fits)."""
        why: list[str] = []
        if not fnmatchcase(release_name, self.release):
            why.append(f"release {release_name} does not match {self.release!r}")
        if environment not in self.environments:
            why.append(f"environment {environment} is not one of {', '.join(self.environments)}")
        if RISK_ORDER.get(risk, 3) > RISK_ORDER[self.max_risk]:
            why.append(f"risk {risk} is above the template's maximum {self.max_risk}")
        extra = [s for s in stages if s not in self.stages]
        if extra:
            why.append(f"stage(s) {', '.join(extra)} not covered by the template")
        return why


class StandardModel(_Strict):
    templates: list[StandardTemplate] = Field(default_factory=list)

    @field_validator("templates")
    @classmethod
    def _unique(cls, v: list[StandardTemplate]) -> list[StandardTemplate]:
        names = [t.name for t in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"template name(s) used twice: {', '.join(sorted(dup))}")
        return v

    def template(self, name: str | None) -> StandardTemplate | None:
        return next((t for t in self.templates if t.name == name), None)


class NormalModel(_Strict):
    approvals: dict[RiskLevel, ApprovalRule] = Field(
        default_factory=lambda: {
            "low": ApprovalRule(count=1),
            "medium": ApprovalRule(count=1, roles=["change-manager", "cab"]),
            "high": ApprovalRule(count=2, roles=["cab"]),
        }
    )
    lead_time_hours: dict[RiskLevel, float] = Field(
        default_factory=lambda: {"low": 0.0, "medium": 24.0, "high": 72.0}
    )
    # separate approvals for check-in and for deployment: an approval names its stage and
    # counts for that stage alone
    approve_each_stage: bool = False
    # a post-implementation review (`ferry rfc close --comment`) before a normal change closes
    review_before_close: bool = False

    @model_validator(mode="after")
    def _every_level(self) -> NormalModel:
        for field in ("approvals", "lead_time_hours"):
            missing = [lvl for lvl in RISK_ORDER if lvl not in getattr(self, field)]
            if missing:
                raise ValueError(f"{field} needs an entry for {', '.join(missing)}")
        if any(h < 0 for h in self.lead_time_hours.values()):
            raise ValueError("lead_time_hours must not be negative")
        return self


class EmergencyModel(_Strict):
    approvals: ApprovalRule = Field(default_factory=lambda: ApprovalRule(count=1, roles=["ecab"]))
    review_within_days: int = Field(5, ge=1, le=90)
    approve_each_stage: bool = False


class RiskWeights(_Strict):
    """Points per factor; the sum is the score, and `levels` turn the score into low/medium/high."""

    criticality: dict[RiskLevel, int] = Field(
        default_factory=lambda: {"low": 0, "medium": 2, "high": 4}
    )
    model: dict[ModelName, int] = Field(
        default_factory=lambda: {"standard": 0, "normal": 1, "emergency": 2}
    )
    hosts_few: int = Field(3, ge=1, description="up to this many hosts: 1 point (one host: 0)")
    hosts_many_points: int = Field(2, ge=0, description="more hosts, or the whole environment")
    release_large_mb: float = Field(100.0, gt=0, description="a bigger package: 2 points")
    release_medium_mb: float = Field(10.0, gt=0, description="a bigger package: 1 point")
    failure_points: int = Field(2, ge=0, description="per failed/backed-out deployment, 30 days")
    failure_cap: int = Field(4, ge=0)
    low_max: int = Field(2, ge=0, description="score up to this: low")
    medium_max: int = Field(5, ge=0, description="score up to this: medium; above: high")

    @model_validator(mode="after")
    def _ordered(self) -> RiskWeights:
        if self.medium_max < self.low_max:
            raise ValueError("medium_max must be at least low_max")
        return self


class Models(_Strict):
    standard: StandardModel = Field(default_factory=StandardModel)
    normal: NormalModel = Field(default_factory=NormalModel)
    emergency: EmergencyModel = Field(default_factory=EmergencyModel)


class ChangeModels(_Strict):
    """The whole `change_models.yaml`: who may approve as what, the three models, risk weights."""

    roles: dict[str, list[Role]] = Field(default_factory=dict)
    models: Models = Field(default_factory=Models)
    risk: RiskWeights = Field(default_factory=RiskWeights)

    def holds(self, user: str, role: str) -> bool:
        return role in self.roles.get(user, [])


def parse_instant(text: str) -> datetime:
    """ISO 8601; a time without offset is taken as UTC (documented in docs/change.md)."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    try:
        at = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 time (e.g. 2025-06-03T22:00+02:00)"
        ) from None
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


def parse_window(text: str) -> tuple[datetime, datetime]:
    """`START/END` in ISO 8601 → a UTC pair with START < END."""
    parts = text.split("/")
    if len(parts) != 2:
        raise ValueError(f"{text!r} is not START/END (e.g. 2025-06-03T22:00Z/2025-06-03T23:30Z)")
    start, end = parse_instant(parts[0]), parse_instant(parts[1])
    if end <= start:
        raise ValueError(f"{text!r} ends before it starts")
    return start, end


class RfcRequest(_Strict):
    """What `ferry rfc new` was given, validated before anything is written."""

    release: str
    environment: str = Field(pattern=rf"^{_NAME}$")
    model: ModelName
    template: str | None = None
    windows: list[tuple[datetime, datetime]] = Field(default_factory=list)
    hosts: list[str] = Field(default_factory=list)
    stages: list[StageName] = Field(default_factory=lambda: list(DEFAULT_STAGES))
    risk: RiskLevel | None = None
    reason: str | None = None
    title: str = Field("", max_length=300)
    backout_plan: str = ""
    release_size: int | None = Field(None, ge=0, description="package bytes, if known")

    @field_validator("release")
    @classmethod
    def _release(cls, v: str) -> str:
        try:
            return str(ReleaseRef.parse(v.strip()))
        except BadInput as exc:  # a ValueError is what pydantic reports as this field's problem
            raise ValueError(exc.message) from None

    @field_validator("windows", mode="before")
    @classmethod
    def _windows(cls, v: object) -> object:
        if isinstance(v, list):
            return [parse_window(w) if isinstance(w, str) else w for w in v]
        return v

    @field_validator("hosts", mode="before")
    @classmethod
    def _hosts(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            out = [h.strip() for item in v for h in str(item).split(",") if h.strip()]
            if v and not out:  # e.g. --hosts ',,': no hosts means every host of the environment
                raise ValueError(
                    "names no host; leave the option out for the whole environment, or name "
                    "hosts or patterns (e.g. web-1,web-*)"
                )
            bad = [h for h in out if not _HOST_PATTERN.match(h)]
            if bad:
                raise ValueError(f"{bad[0]!r} is not a host name or pattern (e.g. web-*)")
            return out
        return v

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, v: object) -> object:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            out = [s.strip() for item in v for s in str(item).split(",") if s.strip()]
            if not out:
                raise ValueError("name at least one stage (plan, checkin, deploy)")
            return list(dict.fromkeys(out))
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RfcRequest:
        if self.risk is not None and not (self.reason or "").strip():
            raise ValueError("reason: overriding the risk needs --reason TEXT")
        if self.model == "standard" and not self.template:
            raise ValueError("template: a standard change names its template (--template NAME)")
        if self.model != "standard" and self.template:
            raise ValueError("template: only standard changes use a template")
        return self

    @property
    def release_name(self) -> str:
        return ReleaseRef.parse(self.release).name
