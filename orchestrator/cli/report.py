"""`ferry report`: ITIL change KPIs, release and deployment figures and DORA's four keys,
from the CMS alone (read-only), as text, JSON or a static HTML dashboard with plots.

The figures are computed by `orchestrator.insight` (pure functions over plain rows); this
command only parses the options, reads the records, and writes the output.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.errors import BadInput

HELP = """ITIL change KPIs, release and deployment figures, and DORA's four keys, computed from
the CMS (read-only). Every figure says how it was computed; an empty period gives zeros.

\b
The period is [--since, --until): by default the last 30 days up to now. A date without a
time (2026-06-01) is midnight UTC; as --until it means the end of that day. DORA's keys are
for --env when given, else for --production (default: production).
\b
-o html writes the dashboard (index.html, timeline.png, trends.png) into --out DIR (default
./ferry-report): environments × releases, recent deployments with their waves, RFCs
awaiting action, every figure and the plots. It opens from the file; no server needed.
With -o json or text, --out DIR also writes the plots and report.json there.
\b
Examples:
  ferry report                                  the last 30 days, every environment
  ferry report --env production --since 2026-01-01 -o json
  ferry report -o html --out /var/www/ferry     the dashboard page
"""


class ReportFormat(StrEnum):
    text = "text"
    json = "json"
    html = "html"


def register(app: typer.Typer) -> None:
    app.command(name="report", help=HELP)(report)


def parse_bound(text: str, option: str, *, end: bool) -> datetime:
    from orchestrator.change.models import parse_instant

    try:
        at = parse_instant(text)
    except ValueError as exc:
        raise BadInput(f"{option}: {exc}") from None
    if end and len(text.strip()) == 10:  # a date alone: through the end of that day
        at += timedelta(days=1)
    return at


def report(
    env: Annotated[str | None, typer.Option("--env", "-e", help="only this environment")] = None,
    since: Annotated[str | None, typer.Option(help="period start (ISO date or time, UTC)")] = None,
    until: Annotated[str | None, typer.Option(help="period end (default: now)")] = None,
    production: Annotated[
        str, typer.Option(help="the environment DORA's keys are for (without --env)")
    ] = "production",
    fmt: Annotated[
        ReportFormat, typer.Option("--output", "-o", help="text, json or html")
    ] = ReportFormat.text,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="directory for the dashboard, plots, JSON")
    ] = None,
) -> None:
    out.use(out.Format.json if fmt is ReportFormat.json else out.Format.text)
    now = datetime.now(UTC)
    end = parse_bound(until, "--until", end=True) if until else now
    start = parse_bound(since, "--since", end=False) if since else end - timedelta(days=30)
    if start >= end:
        raise BadInput(f"--since {since or start.isoformat()} is not before --until {until or end}")
    if fmt is ReportFormat.html and out_dir is None:
        out_dir = Path("ferry-report")
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise BadInput(f"--out: {out_dir} exists and is not a directory")

    from orchestrator.insight.figure import Period
    from orchestrator.insight.governance import governance_report
    from orchestrator.insight.records import gather
    from orchestrator.settings import get_settings

    period = Period(start, end)
    records = gather(get_settings().cms_url, since=start)
    data = governance_report(records, period, now, environment=env, production=production)
    if out_dir is not None:
        data["files"] = write_files(out_dir, data, records, period, html=fmt is ReportFormat.html)
    if fmt is ReportFormat.html:
        out.progress(f"dashboard written: {data['files']['html']}")
        return
    out.result(data, lambda: print_report(data))


def write_files(
    out_dir: Path, data: dict[str, Any], records: Any, period: Any, *, html: bool
) -> dict[str, str]:
    import json

    from orchestrator.insight import dashboard, plots

    scope = [d for d in records.deployments if data["environment"] in (None, d["environment"])]
    in_period = [d for d in scope if d["started_at"] in period]
    pngs = {
        "timeline": plots.timeline_png(in_period),
        "trends": plots.trends_png(plots.trend_series(scope, period.since, period.until)),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    for name, png in pngs.items():
        path = out_dir / f"{name}.png"
        path.write_bytes(png)
        files[name] = str(path)
    if html:
        path = out_dir / "index.html"
        path.write_text(dashboard.render(data, pngs), encoding="utf-8")
        files["html"] = str(path)
    else:
        path = out_dir / "report.json"
        path.write_text(json.dumps(data, indent=2, default=str))
        files["json"] = str(path)
    return files


def _p(text: str) -> None:
    out.stdout.print(text, highlight=False, markup=False)


def _value(fig: dict[str, Any]) -> str:
    v, unit = fig["value"], fig.get("unit", "")
    if unit == "ratio":
        return f"{float(v) * 100:.1f}%"
    if unit == "s":
        return f"{float(v):.1f} s (median; mean {fig['mean']:.1f} s over {fig['count']})"
    return f"{v} {unit}".strip()


def _line(name: str, fig: dict[str, Any]) -> None:
    _p(f"  {name}: {_value(fig)}")
    _p(f"      how: {fig['how']}")


def print_report(data: dict[str, Any]) -> None:
    p = data["period"]
    _p(
        f"Ferry report {p['since']} → {p['until']} ({p['days']} days)"
        + (f", environment {data['environment']}" if data["environment"] else "")
    )
    ch, rel, dora = data["change"], data["release"], data["dora"]
    _p("ITIL change KPIs")
    _line("changes", ch["changes"])
    for m, f in ch["by_model"].items():
        _p(f"  {m}: {f['value']} ({f['share'] * 100:.1f}%)")
    for key in ("implemented", "success_rate", "backed_out", "failed"):
        _line(key.replace("_", " "), ch[key])
    _line("unauthorized changes found by drift audits", ch["unauthorized_found_by_drift"])
    for key, f in ch["lead_time"].items():
        _line("lead time " + key.replace("_", " "), f)
    _line("emergency changes awaiting review", ch["emergency_awaiting_review"])
    approvals = ch["approvals_per_approver"]
    _p(
        "  approvals per approver: "
        + (", ".join(f"{w}: {v['approvals']}" for w, v in approvals["value"].items()) or "none")
        + f" (self-approvals: {approvals['self_approvals']})"
    )
    _p("Release and deployment")
    for key in ("deployments", "waves", "hosts_changed", "milestones_failed", "manual_backouts"):
        _line(key.replace("_", " "), rel[key])
    for m in rel["milestones_failed"]["where"]:
        _p(f"    deployment {m['deployment']} wave {m['wave']}: {m['reason']}")
    _line("backout duration", rel["backout_duration"])
    _line("hosts needing remediation", rel["needs_remediation"])
    _line("MTRS", rel["mtrs"])
    _p(f"DORA keys ({dora['environment']})")
    for key in ("deployment_frequency", "lead_time_for_changes", "change_failure_rate"):
        _line(key.replace("_", " "), dora[key])
    _line("time to restore", dora["time_to_restore"])
    els = data["els"]
    _p("Early life support")
    _line("deployments under ELS", els["deployments"])
    for r in els["rows"]:
        _p(
            f"    deployment {r['deployment']} ({r['release']}, {r['environment']}): "
            f"{r['outcome']}, {r['runs']} run(s), {len(r['failures'])} failed"
        )
    for k, v in (data.get("files") or {}).items():
        _p(f"{k}: {v}")
