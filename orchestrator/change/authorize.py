"""The change decision: may this stage of this release touch these hosts now? Pure, no I/O.

`authorize(...)` looks only at a snapshot of the RFC (`RfcView`), the change models and the
calendar, and returns a `Decision` with *every* reason: all the reasons for a refusal (so
the person learns everything that is missing at once), or why it is allowed. It re-checks
the approvals against the change model itself instead of trusting the RFC's status, so no
sequence of lifecycle actions can authorize a deployment that lacks its approvals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from dml.ref import ReleaseRef
from orchestrator.change.calendar import Calendar, Interval
from orchestrator.change.models import DEFAULT_STAGES, ApprovalRule, ChangeModels

#: statuses in which an RFC authorizes its stages (implemented: a re-run of the same deploy)
AUTHORIZING = frozenset({"authorized", "scheduled", "implementing", "implemented"})
_HORIZON = timedelta(days=31)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"allowed": self.allowed, "reasons": list(self.reasons)}


@dataclass(frozen=True)
class ApprovalView:
    approver: str
    role: str
    decision: str  # "approved" or "rejected"
    at: datetime | None = None
    stage: str | None = None  # the stage it approves, under a model that approves each stage


@dataclass(frozen=True)
class RfcView:
    """A frozen snapshot of an RFC with its approvals and windows (UTC)."""

    id: int
    release: str
    environment: str
    model: str
    status: str
    requester: str
    risk: str = "low"
    template: str | None = None
    stages: tuple[str, ...] = DEFAULT_STAGES
    hosts: tuple[str, ...] = ()
    windows: tuple[Interval, ...] = ()
    approvals: tuple[ApprovalView, ...] = ()
    submitted_at: datetime | None = None


def _fmt(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M UTC")


def approval_rule(rfc: RfcView, models: ChangeModels) -> ApprovalRule | None:
    """The approvals this RFC's model asks for (None: a standard change needs none)."""
    if rfc.model == "normal":
        return models.models.normal.approvals.get(rfc.risk)  # type: ignore[call-overload]
    if rfc.model == "emergency":
        return models.models.emergency.approvals
    return None


def approves_each_stage(rfc: RfcView, models: ChangeModels) -> bool:
    """Does the RFC's change model demand a separate approval for each stage?"""
    if rfc.model == "normal":
        return models.models.normal.approve_each_stage
    if rfc.model == "emergency":
        return models.models.emergency.approve_each_stage
    return False


def first_stage(rfc: RfcView) -> str:
    """The stage an RFC's authorization (its status) rests on under per-stage approvals."""
    order = ("plan", "checkin", "deploy")
    return min(rfc.stages, key=lambda s: order.index(s) if s in order else len(order))


def valid_approvals(
    rfc: RfcView, models: ChangeModels, stage: str | None = None
) -> list[ApprovalView]:
    """Approvals that count: not by the requester, in a role the approver holds, one each;
    under a model that approves each stage, only those for `stage` (default: the first)."""
    if approves_each_stage(rfc, models):
        stage = stage or first_stage(rfc)
    else:
        stage = None
    seen: set[str] = set()
    out: list[ApprovalView] = []
    for a in rfc.approvals:
        if a.decision != "approved" or a.approver == rfc.requester or a.approver in seen:
            continue
        if stage is not None and a.stage != stage:
            continue
        if not models.holds(a.approver, a.role):
            continue
        seen.add(a.approver)
        out.append(a)
    return out


def missing_authorization(
    rfc: RfcView, models: ChangeModels, stage: str | None = None
) -> list[str]:
    """What the change model still requires (empty: the RFC's authorization is complete);
    under per-stage approvals, for `stage` (default: the RFC's first stage)."""
    rejections = [a for a in rfc.approvals if a.decision == "rejected"]
    if rejections:
        return [f"RFC-{rfc.id} was rejected by {a.approver} ({a.role})" for a in rejections]
    if rfc.model == "standard":
        template = models.models.standard.template(rfc.template)
        if template is None:
            return [f"standard template {rfc.template!r} is not in the change models"]
        name = ReleaseRef.parse(rfc.release).name
        return [
            f"template {template.name}: {why}"
            for why in template.mismatches(name, rfc.environment, rfc.risk, list(rfc.stages))
        ]
    rule = approval_rule(rfc, models)
    if rule is None:
        return [f"unknown change model {rfc.model!r}"]
    valid = valid_approvals(rfc, models, stage)
    have = ", ".join(f"{a.approver} as {a.role}" for a in valid) or "none"
    which = ""
    if approves_each_stage(rfc, models):
        which = f" for the {stage or first_stage(rfc)} stage (its model approves each stage)"
    missing: list[str] = []
    if len(valid) < rule.count:
        missing.append(
            f"{rfc.model} change at {rfc.risk} risk needs {rule.describe()}{which}; "
            f"has {len(valid)} ({have})"
        )
    elif rule.roles and not any(a.role in rule.roles for a in valid):
        missing.append(
            f"{rfc.model} change needs an approval by {' or '.join(rule.roles)}{which}; has {have}"
        )
    return missing


def _hosts_refused(rfc: RfcView, hosts: list[str] | None) -> list[str]:
    if not rfc.hosts or not hosts:
        return []
    outside = [h for h in hosts if not any(fnmatchcase(h, p) for p in rfc.hosts)]
    if not outside:
        return []
    return [
        f"host(s) {', '.join(sorted(outside))} not named by RFC-{rfc.id} "
        f"(it names {', '.join(rfc.hosts)})"
    ]


def _timing(
    rfc: RfcView, environment: str, now: datetime, models: ChangeModels, calendar: Calendar
) -> tuple[list[str], list[str]]:
    """(refusals, approvals) about *when*: windows, blackouts, lead time."""
    no: list[str] = []
    yes: list[str] = []
    emergency = rfc.model == "emergency"
    window: Interval | None = None
    if rfc.windows:
        window = next(((a, b) for a, b in rfc.windows if a <= now < b), None)
        if window is None:
            later = sorted(a for a, _ in rfc.windows if a > now)
            hint = f"; next opens {_fmt(later[0])}" if later else "; all of them have passed"
            no.append(f"{_fmt(now)} is outside RFC-{rfc.id}'s windows{hint}")
        else:
            yes.append(f"inside RFC-{rfc.id}'s window until {_fmt(window[1])}")
    if emergency:
        yes.append("emergency change: environment windows, blackouts and lead time bypassed")
        return no, yes
    env_window = calendar.window_at(environment, now)
    if env_window is None:
        upcoming = calendar.occurrences(environment, now, now + _HORIZON)
        specs = "; ".join(w.spec or "window" for w in calendar.env(environment).windows)
        hint = f"; next opens {_fmt(upcoming[0][0])}" if upcoming else ""
        no.append(f"{_fmt(now)} is outside {environment}'s change windows ({specs}){hint}")
    elif calendar.env(environment).windows:
        yes.append(f"inside {environment}'s change window until {_fmt(env_window[1])}")
    blackout = calendar.blackout_at(environment, now)
    if blackout is not None:
        no.append(
            f"blackout {blackout.name!r} in {environment} until {_fmt(blackout.end)} "
            "(only emergency changes)"
        )
    if rfc.model == "normal":
        hours = models.models.normal.lead_time_hours.get(rfc.risk, 0.0)  # type: ignore[call-overload]
        if rfc.submitted_at is None:
            no.append(f"RFC-{rfc.id} was never submitted")
        elif hours:
            earliest = rfc.submitted_at + timedelta(hours=hours)
            # lead time runs from submission to the start of the window in use; in an
            # environment open at all times, to the moment of the change
            if rfc.windows:
                opened = window[0] if window else None
            elif calendar.env(environment).windows:
                opened = env_window[0] if env_window else None
            else:
                opened = now
            if opened is not None and opened < earliest:
                no.append(
                    f"{rfc.risk} risk needs {hours:g}h lead time: submitted "
                    f"{_fmt(rfc.submitted_at)}, so the first usable window opens at or after "
                    f"{_fmt(earliest)}"
                )
    return no, yes


def authorize(
    rfc: RfcView,
    stage: str,
    environment: str | None,
    hosts: list[str] | None,
    release: str,
    now: datetime,
    models: ChangeModels,
    calendar: Calendar,
) -> Decision:
    """Every reason this stage may or may not happen now; allowed only when there are none."""
    no: list[str] = []
    yes: list[str] = []
    if rfc.status not in AUTHORIZING:
        no.append(f"RFC-{rfc.id} is {rfc.status}, not authorized")
    missing = missing_authorization(rfc, models, stage)
    no.extend(missing)
    if not missing:
        how = f"template {rfc.template}" if rfc.model == "standard" else "its approvals"
        yes.append(f"RFC-{rfc.id} ({rfc.model}, {rfc.risk} risk) is authorized by {how}")
    if rfc.release != release:
        no.append(f"RFC-{rfc.id} is for {rfc.release}, not {release}")
    if stage not in rfc.stages:
        no.append(f"RFC-{rfc.id} does not cover the {stage} stage ({', '.join(rfc.stages)})")
    if environment is not None and environment != rfc.environment:
        no.append(f"RFC-{rfc.id} is for environment {rfc.environment}, not {environment}")
    if stage == "deploy":
        if environment is None:
            no.append("a deployment must name its environment")
        no.extend(_hosts_refused(rfc, hosts))
        t_no, t_yes = _timing(rfc, rfc.environment, now, models, calendar)
        no.extend(t_no)
        yes.extend(t_yes)
    if no:
        return Decision(False, no)
    return Decision(True, yes or [f"RFC-{rfc.id} authorizes {stage} of {release}"])
