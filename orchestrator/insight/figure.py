"""A figure of the report: a value and how it was computed (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import mean, median
from typing import Any


@dataclass(frozen=True)
class Period:
    """[since, until): a record belongs to the period when its own time falls inside."""

    since: datetime
    until: datetime

    def __contains__(self, at: datetime | None) -> bool:
        return at is not None and self.since <= at < self.until

    @property
    def days(self) -> float:
        return max((self.until - self.since).total_seconds() / 86400, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"since": iso(self.since), "until": iso(self.until), "days": round(self.days, 3)}


def iso(at: datetime | None) -> str | None:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ") if at else None


def figure(value: Any, how: str, unit: str = "", **detail: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"value": value, "unit": unit, "how": how}
    out.update(detail)
    return out


def ratio(part: int, whole: int) -> float:
    """part/whole, 0.0 for an empty whole: an empty period gives zeros, not an error."""
    return round(part / whole, 4) if whole else 0.0


def seconds(delta: timedelta) -> float:
    return round(delta.total_seconds(), 3)


def durations(values: list[float], how: str) -> dict[str, Any]:
    """A duration figure: the median (its value), the mean and the count, in seconds."""
    return figure(
        round(median(values), 3) if values else 0.0,
        how,
        "s",
        mean=round(mean(values), 3) if values else 0.0,
        count=len(values),
        samples=[round(v, 3) for v in values],
    )
