"""The change calendar (`deploy_plans/calendar.yaml`): windows, blackouts, conflicts. Pure.

Each environment has recurring windows written the way people say them
("Tue,Thu 22:00-02:00 Europe/Berlin": a window may run past midnight; times are wall-clock in
that zone, so a window stays at 22:00 local across daylight-saving changes) and blackouts
(absolute freeze periods). An environment with no windows is open at any time; one missing
from the calendar gets `defaults`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fnmatch import fnmatchcase
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.change.models import RiskLevel

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_SPEC = re.compile(
    r"^\s*(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})"
    r"(?:\s+(?P<tz>\S+))?\s*$"
)

Interval = tuple[datetime, datetime]


def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r} (e.g. Europe/Berlin, UTC)") from None


def _days(text: str) -> frozenset[int]:
    low = text.lower()
    if low in ("daily", "*", "mon-sun"):
        return frozenset(range(7))
    out: set[int] = set()
    for part in low.split(","):
        ends = part.split("-")
        if len(ends) > 2 or any(e[:3] not in DAYS or len(e) < 3 for e in ends):
            raise ValueError(f"{part!r} is not a day or range (Mon..Sun, e.g. Mon-Fri or Tue,Thu)")
        a, b = DAYS.index(ends[0][:3]), DAYS.index(ends[-1][:3])
        out.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])
    return frozenset(out)


def _clock(text: str) -> time:
    h, m = (int(x) for x in text.split(":"))
    if h == 24 and m == 0:
        return time(0, 0)
    if not (0 <= h < 24 and 0 <= m < 60):
        raise ValueError(f"{text!r} is not a time of day (00:00-24:00)")
    return time(h, m)


class RecurringWindow(BaseModel):
    """Weekly: on `days`, `start` to `end` wall-clock in `tz` (end ≤ start: ends next day)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    days: frozenset[int]
    start: time
    end: time
    tz: str = "UTC"
    spec: str = ""

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        m = _SPEC.match(v)
        if not m:
            raise ValueError(
                f"{v!r} is not 'DAYS HH:MM-HH:MM [ZONE]' (e.g. 'Tue,Thu 22:00-02:00 Europe/Berlin')"
            )
        tz = m["tz"] or "UTC"
        _zone(tz)
        return {
            "days": _days(m["days"]),
            "start": _clock(m["start"]),
            "end": _clock(m["end"]),
            "tz": tz,
            "spec": v.strip(),
        }

    @field_validator("tz")
    @classmethod
    def _tz(cls, v: str) -> str:
        _zone(v)
        return v

    def _on(self, day: date) -> Interval:
        zone = _zone(self.tz)
        start = datetime.combine(day, self.start, zone)
        end_day = day if self.end > self.start else day + timedelta(days=1)
        end = datetime.combine(end_day, self.end, zone)
        return start.astimezone(UTC), end.astimezone(UTC)

    def occurrences(self, start: datetime, end: datetime) -> Iterator[Interval]:
        """Every occurrence overlapping [start, end), oldest first."""
        zone = _zone(self.tz)
        day = start.astimezone(zone).date() - timedelta(days=1)
        last = end.astimezone(zone).date()
        while day <= last:
            if day.weekday() in self.days:
                a, b = self._on(day)
                if a < end and b > start:
                    yield a, b
            day += timedelta(days=1)

    def occurrence_at(self, at: datetime) -> Interval | None:
        return next(iter(self.occurrences(at, at + timedelta(microseconds=1))), None)


class Blackout(BaseModel):
    """A freeze: non-emergency changes are refused from `start` to `end`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    start: datetime
    end: datetime
    tz: str = "UTC"

    @model_validator(mode="before")
    @classmethod
    def _times(cls, v: Any) -> Any:
        if isinstance(v, dict):
            v = dict(v)
            zone = _zone(str(v.get("tz", "UTC")))
            for key in ("start", "end"):
                if key in v:
                    v[key] = _instant(v[key], zone)
        return v

    @model_validator(mode="after")
    def _ordered(self) -> Blackout:
        if self.end <= self.start:
            raise ValueError(f"blackout {self.name!r} ends before it starts")
        return self

    def covers(self, at: datetime) -> bool:
        return self.start <= at < self.end


def _instant(raw: Any, zone: ZoneInfo) -> Any:
    """A blackout bound: ISO text, YAML timestamp or date; without offset, in the blackout's tz."""
    if isinstance(raw, datetime):
        at = raw
    elif isinstance(raw, date):
        at = datetime.combine(raw, time(0))
    elif isinstance(raw, str):
        text = raw.strip()
        text = text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{raw!r} is not an ISO 8601 time") from None
    else:
        return raw
    return (at if at.tzinfo else at.replace(tzinfo=zone)).astimezone(UTC)


class EnvironmentCalendar(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    criticality: RiskLevel = "medium"
    windows: list[RecurringWindow] = Field(default_factory=list)
    blackouts: list[Blackout] = Field(default_factory=list)


class Calendar(BaseModel):
    """The whole `calendar.yaml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    defaults: EnvironmentCalendar = Field(default_factory=EnvironmentCalendar)
    environments: dict[str, EnvironmentCalendar] = Field(default_factory=dict)
    blackouts: list[Blackout] = Field(default_factory=list, description="for every environment")

    def env(self, name: str) -> EnvironmentCalendar:
        return self.environments.get(name, self.defaults)

    def blackout_at(self, environment: str, at: datetime) -> Blackout | None:
        return next((b for b in self._blackouts(environment) if b.covers(at)), None)

    def _blackouts(self, environment: str) -> list[Blackout]:
        return [*self.blackouts, *self.env(environment).blackouts]

    def window_at(self, environment: str, at: datetime) -> Interval | None:
        """The environment window open at `at`; an environment without windows is always open."""
        env = self.env(environment)
        if not env.windows:
            return (datetime.min.replace(tzinfo=UTC), datetime.max.replace(tzinfo=UTC))
        for w in env.windows:
            occ = w.occurrence_at(at)
            if occ:
                return occ
        return None

    def fits(self, environment: str, start: datetime, end: datetime) -> bool:
        """Does [start, end) lie inside one window occurrence of the environment?"""
        env = self.env(environment)
        if not env.windows:
            return True
        return any(
            a <= start and end <= b for w in env.windows for a, b in w.occurrences(start, end)
        )

    def blackouts_overlapping(
        self, environment: str, start: datetime, end: datetime
    ) -> list[Blackout]:
        return [b for b in self._blackouts(environment) if b.start < end and b.end > start]

    def occurrences(self, environment: str, start: datetime, end: datetime) -> list[Interval]:
        env = self.env(environment)
        return sorted(o for w in env.windows for o in w.occurrences(start, end))


@dataclass(frozen=True)
class Booking:
    """What conflict detection needs of an RFC: its hosts and windows (empty: any window)."""

    rfc_id: int
    environment: str
    hosts: tuple[str, ...]
    windows: tuple[Interval, ...]


def hosts_overlap(a: Iterable[str], b: Iterable[str]) -> bool:
    """Patterns may touch the same host; naming no hosts means the whole environment."""
    a, b = list(a), list(b)
    if not a or not b:
        return True
    return any(x == y or fnmatchcase(x, y) or fnmatchcase(y, x) for x in a for y in b)


def windows_overlap(a: Iterable[Interval], b: Iterable[Interval]) -> bool:
    """No windows of its own means the RFC may run in any environment window: overlap."""
    a, b = list(a), list(b)
    if not a or not b:
        return True
    return any(s1 < e2 and s2 < e1 for s1, e1 in a for s2, e2 in b)


def conflicts(booking: Booking, others: Iterable[Booking]) -> list[int]:
    """Ids of other RFCs that may change the same hosts of the same environment at once."""
    return [
        o.rfc_id
        for o in others
        if o.rfc_id != booking.rfc_id
        and o.environment == booking.environment
        and hosts_overlap(booking.hosts, o.hosts)
        and windows_overlap(booking.windows, o.windows)
    ]
