"""`ferry status`: baselines, recent deployments, and what needs remediation (CMS only)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

HELP = """What the CMS knows now: environment and host baselines, recent deployments, and the
hosts that need remediation. Reads records only; no host is contacted (for what hosts
really run, `ferry remediate drift`).

\b
Needs remediation lists:
  failed       a backout could not restore these hosts  → ferry remediate backout ID --rfc R
  interrupted  running/planned, no finish, no live process → ferry remediate recover ID
               ("possibly interrupted": it ran on another machine, Ferry cannot tell)
  drifted, tampered, unreachable
               found so by the newest drift audit of the host, and not deployed since
               → the audit's next step (deploy the baseline again, or check the host)
\b
Examples:
  ferry status                       everything, newest deployments first
  ferry status --env prod            one environment
  ferry status --deployment 7        one deployment: waves, every host's journal, evidence
  ferry status --host web3 -o json   one host: its baseline and the deployments touching it
"""


def register(app: typer.Typer) -> None:
    app.command(name="status", help=HELP)(status)


def status(
    env: Annotated[str | None, typer.Option("--env", "-e", help="only this environment")] = None,
    deployment: Annotated[
        str | None,
        typer.Option("--deployment", "-d", metavar="ID", help="show one deployment in detail"),
    ] = None,
    host: Annotated[str | None, typer.Option("--host", help="only this host")] = None,
    limit: Annotated[int, typer.Option("--limit", help="recent deployments shown", min=1)] = 10,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.settings import get_settings
    from remediation.status import gather

    data = gather(
        get_settings().cms_url, environment=env, deployment=deployment, host=host, limit=limit
    )
    if deployment is None:  # pull hosts waiting for their own time: pending, not deployed
        from orchestrator.pullstate import pending

        data["pending"] = [
            p for p in pending(get_settings().cms_url, env) if host is None or p["host"] == host
        ]
    if deployment is not None:
        out.result(data, lambda: print_detail(data["deployment"]))
    else:
        out.result(data, lambda: print_status(data))


def _p(text: str) -> None:
    out.stdout.print(text, highlight=False, markup=False)


def _t(value: Any) -> str:
    return f"{value:%Y-%m-%d %H:%M:%S}" if value is not None else "—"


def print_status(data: dict[str, Any]) -> None:
    _p("Environments:")
    for e in data["environments"] or [{"environment": "(none recorded)"}]:
        if "release" in e:
            _p(f"  {e['environment']}: {e['release']}  (deployment {e['deployment']})")
        else:
            _p(f"  {e['environment']}")
    _p("Hosts:")
    by_release: dict[str, list[str]] = {}
    for h in data["hosts"]:
        images = "".join(f"  {u}={i[:19]}" for u, i in sorted((h.get("images") or {}).items()))
        by_release.setdefault(f"{h['environment']}: {h['release']}{images}", []).append(h["host"])
    for key, names in by_release.items():
        _p(f"  {key}  ({len(names)}): {', '.join(names)}")
    if not data["hosts"]:
        _p("  (no host baseline recorded)")
    for p in data.get("pending", []):
        _p(f"  {p['host']}: pending {p['release_id']} (apply: {p['apply']}, pull)")
    _p("Recent deployments:")
    for d in data["deployments"]:
        live = f" [{d['liveness']}]" if d["liveness"] else ""
        what = f"{d['release']} → {d['environment']}  {d['strategy']}"
        if d["strategy"] == "backout":
            what = f"backout of {d['release']} in {d['environment']}"
        _p(
            f"  {d['id']:>4}  {d['status']}{live}  {what}  {d['rfc'] or 'no RFC'}  "
            f"{_t(d['started_at'])} … {_t(d['finished_at'])}"
        )
        if d["reason"]:
            _p(f"        {d['reason']}")
    if not data["deployments"]:
        _p("  (none)")
    needs = data["needs_remediation"]
    _p("Needs remediation:" + ("" if needs else " nothing"))
    for n in needs:
        origin = f"drift audit {n['audit']}" if n.get("audit") else f"deployment {n['deployment']}"
        _p(f"  {n['host']}: {n['state']} ({origin}): {n['reason']}")
        _p(f"        next: {n['next']}")


def print_detail(d: dict[str, Any]) -> None:
    live = f" [{d['liveness']}]" if d["liveness"] else ""
    _p(
        f"deployment {d['id']}: {d['status']}{live}, {d['release']} → {d['environment']} "
        f"({d['strategy']}, {d['rfc'] or 'no RFC'}, by {d['actor']})"
    )
    _p(f"  started {_t(d['started_at'])}, finished {_t(d['finished_at'])}")
    ci = d.get("ci")
    if ci:
        _p(
            f"  from {ci['system']} pipeline {ci.get('pipeline_id')} ({ci.get('pipeline_url')}), "
            f"job {ci.get('job')}, commit {ci.get('commit')}, by {ci.get('actor')}"
        )
    if d["evidence"].get("limit"):
        _p(f"  narrowed by --hosts {d['evidence']['limit']}")
    if d["reason"]:
        _p(f"  reason: {d['reason']}")
    for i, s in d["waves"].items():
        _p(f"  wave {i}: {s}")
    for host, steps in d["hosts"].items():
        line = ", ".join(f"{s['step']} {s['status']}" for s in steps)
        _p(f"  {host}: {line}")
    for n in d["needs_remediation"]:
        _p(f"  needs remediation: {n['host']}: {n['state']}: {n['reason']} → {n['next']}")
    els = (d.get("evidence") or {}).get("els")
    if els:
        runs = els.get("runs", [])
        outcome = (els.get("outcome") or {}).get("outcome", "in progress")
        _p(
            f"  early life support: {outcome} ({len(runs)} run(s), "
            f"{sum(1 for r in runs if r.get('failed'))} failed; until "
            f"{els.get('until') or 'the period after success'})"
        )
