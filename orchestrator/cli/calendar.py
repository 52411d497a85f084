"""`ferry calendar`: change windows, blackouts, scheduled RFCs and their conflicts.

Read-only: it shows what the gate will use (the calendar file found by the documented
lookup) and which authorized RFCs may collide, over the next `--days` days.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import BadInput

app = typer.Typer(
    help="Change windows, blackouts, scheduled RFCs and conflicts.",
    invoke_without_command=True,
)

SCHEDULED = ("authorized", "scheduled", "implementing")


def _iso(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@app.callback()
def calendar(
    env: Annotated[str | None, typer.Option(help="only this environment")] = None,
    days: Annotated[int, typer.Option(min=1, max=366, help="how far ahead to list")] = 14,
    at: Annotated[
        str | None, typer.Option(help="start of the view, ISO 8601 (default now)")
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Windows (next occurrences), blackouts and scheduled RFCs per environment, with conflicts."""
    out.use(fmt)
    from sqlalchemy import select

    from orchestrator.change import config, records
    from orchestrator.change.calendar import Booking, conflicts
    from orchestrator.change.models import parse_instant
    from orchestrator.cms import db
    from orchestrator.cms.models import RFC

    try:
        start = parse_instant(at) if at else datetime.now(UTC)
    except ValueError as exc:
        raise BadInput(f"--at: {exc}") from None
    end = start + timedelta(days=days)
    cal = config.load_calendar()
    with db.session_scope() as session:
        query = select(RFC).where(RFC.status.in_(SCHEDULED)).order_by(RFC.id)
        if env:
            query = query.where(RFC.environment == env)
        rfcs = list(session.scalars(query))
        rfc_dicts = [records.to_dict(r) for r in rfcs]
        bookings = [
            Booking(
                r.id,
                r.environment,
                tuple(r.hosts or ()),
                tuple((w.start, w.end) for w in r.windows),
            )
            for r in rfcs
        ]
    names = [env] if env else sorted({*cal.environments, *(r["environment"] for r in rfc_dicts)})
    envs: list[dict[str, Any]] = []
    for name in names:
        spec = cal.env(name)
        envs.append(
            {
                "name": name,
                "configured": name in cal.environments,
                "criticality": spec.criticality,
                "windows": [w.spec for w in spec.windows] or ["always open"],
                "next_windows": [
                    {"start": _iso(a), "end": _iso(b)} for a, b in cal.occurrences(name, start, end)
                ],
                "blackouts": [
                    {"name": b.name, "start": _iso(b.start), "end": _iso(b.end)}
                    for b in cal.blackouts_overlapping(
                        name, start, datetime.max.replace(tzinfo=UTC)
                    )
                ],
                "rfcs": [r for r in rfc_dicts if r["environment"] == name],
            }
        )
    clashes = sorted(
        {tuple(sorted((b.rfc_id, other))) for b in bookings for other in conflicts(b, bookings)}
    )
    data = {
        "from": _iso(start),
        "to": _iso(end),
        "environments": envs,
        "conflicts": [{"rfcs": list(c)} for c in clashes],
    }
    out.result(data, lambda: _render(data))


def _render(data: dict[str, Any]) -> None:
    p = out.stdout.print
    p(f"change calendar {data['from']} → {data['to']}", highlight=False)
    for e in data["environments"]:
        p(
            f"\n{e['name']} (criticality {e['criticality']}): {'; '.join(e['windows'])}",
            highlight=False,
        )
        for w in e["next_windows"]:
            p(f"  window   {w['start']} → {w['end']}", highlight=False)
        for b in e["blackouts"]:
            p(f"  blackout {b['start']} → {b['end']}  {b['name']}", highlight=False)
        for r in e["rfcs"]:
            spans = ", ".join(f"{w['start']} → {w['end']}" for w in r["windows"]) or "any window"
            hosts = ", ".join(r["hosts"]) or "all hosts"
            p(f"  RFC-{r['id']} {r['status']} {r['release']} ({hosts}; {spans})", highlight=False)
    for c in data["conflicts"]:
        p(
            "conflict: " + " and ".join(f"RFC-{i}" for i in c["rfcs"]) + " may change the same "
            "hosts in overlapping windows",
            highlight=False,
        )
