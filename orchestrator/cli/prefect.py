"""`ferry prefect`: the warm Prefect server behind `ferry deploy` — status, start, stop."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

HELP = """The Prefect server that runs Ferry's flows on the embedded default.

\b
With no PREFECT_API_URL, the first `ferry deploy` starts Prefect's server in the
background (6–20 s, once) under the Ferry home (.ferry/prefect: its database, its log
server.log); later commands reuse it and start their flow at once. It stops by itself
after FERRY_PREFECT_IDLE seconds (default 900) without a command using it, or with
`ferry prefect stop`. While it runs, every flow run is visible in Prefect's UI at its URL.
\b
Other modes (ferry prefect status says which one applies):
  PREFECT_API_URL=http://…/api   a standing Prefect server: used as is
  FERRY_PREFECT=ephemeral        a fresh server per command, nothing left running (CI)
\b
Examples:
  ferry prefect status          URL, PID, idle time, log
  ferry prefect start           warm it up now (e.g. before a change window)
  ferry prefect stop            stop it now ("not running" is success too)

Workers (a team's set-up, docs/prefect.md):
  ferry prefect register --pool ferry    work pool + Prefect deployments of Ferry's flows
  prefect worker start --pool ferry      a worker (any machine sharing the CMS and DML)
  ferry deploy PLAN -r R --rfc N --via prefect   submit to the pool and follow it
"""

app = typer.Typer(help=HELP, no_args_is_help=True, rich_markup_mode=None)


def _home() -> Path:
    from orchestrator.prefect_env import prefect_home

    return prefect_home()


def _mode_note(mode: str) -> str:
    if mode == "server":
        url = os.environ["PREFECT_API_URL"]
        return f"ferry deploy uses the standing server PREFECT_API_URL={url}, not this one"
    if mode == "ephemeral":
        return "ferry deploy starts its own ephemeral server (FERRY_PREFECT=ephemeral)"
    return "ferry deploy uses this warm server (started on first use)"


@app.command()
def status(fmt: OutputOpt = out.Format.text) -> None:
    """Is the warm server running: URL, PID, idle time, log. Reads only; counts as no use."""
    out.use(fmt)
    from orchestrator.prefect_env import prefect_mode
    from orchestrator.prefect_server import server_status

    mode = prefect_mode()
    data = {**server_status(_home()), "mode": mode}
    out.result(data, lambda: _print_status(data))


@app.command()
def start(fmt: OutputOpt = out.Format.text) -> None:
    """Start the warm server now, or confirm it runs; the first start takes 6–20 s."""
    out.use(fmt)
    from orchestrator.prefect_env import prefect_mode
    from orchestrator.prefect_server import ensure_server, server_status

    home = _home()
    ensure_server(home, hold=False, progress=out.progress)
    data = {**server_status(home), "mode": prefect_mode()}
    out.result(data, lambda: _print_status(data))


@app.command()
def stop(
    force: Annotated[
        bool, typer.Option("--force", help="stop it even while a ferry command uses it")
    ] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Stop the warm server (by its recorded PID); "not running" is success too.

    Refused while a ferry command uses it (exit 2), unless --force. Its run history stays
    in .ferry/prefect; the next ferry deploy starts it again.
    """
    out.use(fmt)
    from orchestrator.prefect_server import stop_server

    data = stop_server(_home(), force=force)
    text = (
        f"stopped the Prefect server at {data['url']} (pid {data['pid']})"
        if data["stopped"]
        else f"Prefect server: {data['reason']}"
    )
    out.result(data, text)


@app.command()
def register(
    pool: Annotated[str, typer.Option("--pool", help="work pool (created if missing)")] = "ferry",
    working_dir: Annotated[
        Path | None,
        typer.Option("--working-dir", help="where workers run the flows (default: here)"),
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Create the work pool (process type) if missing and Prefect deployments of Ferry's
    flows on it (deploy, deploy from the UI, backout, recover); safe to run again.

    Workers started with `prefect worker start --pool POOL` then run them; each worker's own
    environment names the CMS (FERRY_HOME or FERRY_DATABASE_URL) and the DML.
    """
    out.use(fmt)
    from orchestrator.prefect_deployments import register as register_flows
    from orchestrator.prefect_env import configure_prefect

    where = configure_prefect(progress=out.progress)
    made = register_flows(pool, str((working_dir or Path.cwd()).resolve()))

    def text() -> None:
        created = "created" if made[0]["pool_created"] else "exists"
        out.stdout.print(f"work pool {pool} ({created}) on Prefect {where}", highlight=False)
        for m in made:
            out.stdout.print(f"  {m['deployment']}: {m['what']}", highlight=False, markup=False)
        out.stdout.print(f"start a worker: prefect worker start --pool {pool}", highlight=False)

    out.result({"pool": pool, "deployments": made}, text)


def _print_status(data: dict[str, Any]) -> None:
    def p(line: str) -> None:
        out.stdout.print(line, highlight=False, markup=False)

    if data["running"]:
        if data["in_use"]:
            idle = "in use by a running ferry command"
        else:
            idle = (
                f"idle {_duration(data['idle_for_seconds'])} "
                f"(stops after {_duration(data['stops_after_idle_seconds'])})"
            )
        p(f"Prefect server: running at {data['url']}  (UI {data['ui']})")
        p(f"  pid {data['pid']}, since {data['started_at']}, {idle}")
    elif data.get("starting"):
        p(f"Prefect server: starting (pid {data['pid']}), soon at {data['url']}")
    else:
        p("Prefect server: not running (the next ferry deploy starts it)")
    p(f"  log: {data['log']}")
    p(f"  {_mode_note(data['mode'])}")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"
