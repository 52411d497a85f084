"""The static dashboard page (`ferry report -o html --out DIR`): one HTML file that opens
from disk with no server — plots embedded as data: URIs, styles inline, a Content Security
Policy that allows nothing from outside. Pure: the report dict and PNG bytes in, text out.
Every value is escaped.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:.25em .5em;
font-size:.9em;vertical-align:top;text-align:left}th{background:#f3f3f3}
.how{color:#666;font-size:.8em}.cards{display:flex;flex-wrap:wrap;gap:.6em}
.card{border:1px solid #ccc;border-radius:6px;padding:.5em .8em;width:15em}
.card b{font-size:1.3em;display:block}.st-succeeded,.st-baseline,.st-passed{color:#1a7f37}
.st-backed-out,.st-failed,.st-needs-remediation,.st-integrity-failed,.st-aborted{color:#b30000}
.st-in-flight,.st-running{color:#9a6700}img{max-width:100%;border:1px solid #eee}
"""


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def _fmt(fig: dict[str, Any]) -> str:
    v, unit = fig.get("value"), fig.get("unit", "")
    if unit == "ratio":
        return f"{float(v) * 100:.1f}%"
    if unit == "s":
        return _duration(float(v))
    return f"{v} {unit}".strip()


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def _card(title: str, fig: dict[str, Any]) -> str:
    return (
        f'<div class="card" data-figure="{_e(title)}"><span>{_e(title)}</span>'
        f'<b>{_e(_fmt(fig))}</b><span class="how">{_e(fig.get("how"))}</span></div>'
    )


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return ""
    data = base64.b64encode(png).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def render(report: dict[str, Any], plots: dict[str, bytes] | None = None) -> str:
    plots = plots or {}
    ch, rel, dora, board = report["change"], report["release"], report["dora"], report["dashboard"]
    period = report["period"]
    parts = [
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        "<title>Ferry dashboard</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>Ferry: release and change dashboard</h1>",
        f"<p>Period {_e(period['since'])} → {_e(period['until'])} ({_e(period['days'])} days)"
        + (f"; environment {_e(report['environment'])}" if report.get("environment") else "")
        + f"; generated {_e(report['generated_at'])} from the CMS.</p>",
        "<h2>Environments × releases</h2>",
        _grid(board),
        "<h2>Hosts</h2>",
        _hosts(board),
        "<h2>Recent deployments</h2>",
        _recent(board["recent_deployments"]),
        "<h2>RFCs awaiting action</h2>",
        _awaiting(board["rfcs_awaiting_action"]),
        f'<h2>DORA keys ({_e(dora["environment"])})</h2><div class="cards">',
        _card("deployment frequency", dora["deployment_frequency"]),
        _card("lead time for changes", dora["lead_time_for_changes"]),
        _card("change failure rate", dora["change_failure_rate"]),
        _card("time to restore", dora["time_to_restore"]),
        '</div><h2>ITIL change KPIs</h2><div class="cards">',
        _card("changes", ch["changes"]),
        *(_card(f"{m} changes", f) for m, f in ch["by_model"].items()),
        _card("change success rate", ch["success_rate"]),
        _card("changes backed out", ch["backed_out"]),
        _card("failed changes", ch["failed"]),
        _card("unauthorized changes (drift)", ch["unauthorized_found_by_drift"]),
        _card("emergency changes awaiting review", ch["emergency_awaiting_review"]),
        _card("lead time submitted → implemented", ch["lead_time"]["submitted_to_implemented"]),
        "</div>",
        _approvers(ch["approvals_per_approver"]),
        '<h2>Release and deployment</h2><div class="cards">',
        _card("deployments", rel["deployments"]),
        _card("waves", rel["waves"]),
        _card("hosts changed", rel["hosts_changed"]),
        _card("milestones failed", rel["milestones_failed"]),
        _card("backout duration", rel["backout_duration"]),
        _card("hosts needing remediation", rel["needs_remediation"]),
        _card("MTRS", rel["mtrs"]),
        "</div>",
        _milestones(rel["milestones_failed"]["where"]),
        "<h2>Early life support</h2>",
        _els(report.get("els", {}).get("rows", [])),
        "<h2>Plots</h2>",
        _img(plots.get("timeline"), "deployment timeline"),
        _img(plots.get("trends"), "KPI trends"),
        "<script>document.body.dataset.ready = 'yes';</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


def _table(head: list[str], rows: list[list[str]], empty: str, cls: str) -> str:
    if not rows:
        return f'<p class="{cls} empty">{_e(empty)}</p>'
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _grid(board: dict[str, Any]) -> str:
    releases = sorted({r for g in board["grid"].values() for r in g["releases"]})
    rows = []
    for env in board["environments"]:
        g = board["grid"][env]
        cells = [f'<b data-env="{_e(env)}">{_e(env)}</b>', _e(g["baseline"] or "—")]
        for r in releases:
            names = g["releases"].get(r, [])
            cells.append(_e(", ".join(names)) if names else "")
        cells.append(_e(", ".join(g["in_flight"])) or "")
        cells.append(
            f'<span class="st-needs-remediation">{_e(", ".join(g["needs_remediation"]))}</span>'
        )
        rows.append(cells)
    head = ["environment", "baseline", *releases, "in flight", "needs remediation"]
    return _table(head, rows, "no environment has a record yet", "grid")


def _hosts(board: dict[str, Any]) -> str:
    rows = []
    for env in board["environments"]:
        for name, h in board["grid"][env]["hosts"].items():
            rows.append(
                [
                    _e(env),
                    f'<span data-host="{_e(name)}">{_e(name)}</span>',
                    f'<span data-release="{_e(name)}">{_e(h["release"] or "(none)")}</span>',
                    f'<span class="st-{_e(h["state"])}">{_e(h["state"])}</span>',
                ]
            )
    return _table(["environment", "host", "release", "state"], rows, "no host records", "hosts")


def _recent(deps: list[dict[str, Any]]) -> str:
    rows = []
    for d in deps:
        waves = " ".join(
            f'<span class="st-{_e(w["status"])}">{_e(w["index"])}:{_e(w["hosts"])}h '
            f"{_e(w['status'])}</span>"
            for w in d["waves"]
        )
        rows.append(
            [
                _e(d["id"]),
                _e(d["environment"]),
                _e(d["release"]),
                _e(d["strategy"]),
                f'<span class="st-{_e(d["status"])}">{_e(d["status"])}</span>',
                _e(f"RFC-{d['rfc']}" if d["rfc"] else "—"),
                _e(d["started_at"]),
                waves,
                _e(d["els"] or ""),
            ]
        )
    head = ["#", "environment", "release", "strategy", "status", "RFC", "started", "waves", "ELS"]
    return _table(head, rows, "no deployments", "recent")


def _awaiting(rfcs: list[dict[str, Any]]) -> str:
    rows = [
        [_e(f"RFC-{r['id']}"), _e(r["model"]), _e(r["environment"]), _e(r["release"]),
         _e(r["status"]), _e(r["action"])]
        for r in rfcs
    ]  # fmt: skip
    head = ["RFC", "model", "environment", "release", "status", "awaiting"]
    return _table(head, rows, "no RFC awaits action", "awaiting")


def _approvers(fig: dict[str, Any]) -> str:
    rows = [
        [_e(who), _e(v["approvals"]), _e(", ".join(f"{r}: {n}" for r, n in v["roles"].items()))]
        for who, v in fig["value"].items()
    ]
    note = f'<p class="how">{_e(fig["how"])}; self-approvals: {_e(fig["self_approvals"])}</p>'
    return _table(["approver", "approvals", "as"], rows, "no approvals", "approvers") + note


def _milestones(where: list[dict[str, Any]]) -> str:
    rows = [
        [_e(m["deployment"]), _e(m["environment"]), _e(m["release"]), _e(m["wave"]),
         _e(", ".join(m["failed_hosts"])), _e(m["reason"])]
        for m in where
    ]  # fmt: skip
    head = ["deployment", "environment", "release", "wave", "failed hosts", "reason"]
    return _table(head, rows, "no milestone failed", "milestones")


def _els(rows: list[dict[str, Any]]) -> str:
    out = [
        [_e(r["deployment"]), _e(r["environment"]), _e(r["release"]), _e(r["until"]),
         _e(r["runs"]), _e(len(r["failures"])), _e(r["outcome"])]
        for r in rows
    ]  # fmt: skip
    head = ["deployment", "environment", "release", "until", "runs", "failed runs", "outcome"]
    return _table(head, out, "no deployment under early life support", "els")
