"""`ferry warm`: the warm process that runs commands without Python's start-up cost."""

from __future__ import annotations

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

HELP = """The warm process: Ferry's modules imported once, a child forked per command.

\b
A cold `ferry deploy` spends ~4 s of CPU importing Prefect, SQLAlchemy and pydantic before
its own work; `ferry status` ~2 s. After a command, Ferry starts a warm process of your user
in the background (its socket in FERRY_WARM_DIR, else $XDG_RUNTIME_DIR/ferry, else
/tmp/ferry-<uid>, mode 0700); later commands connect to it and run in a forked child with
your environment, directory, terminal and signals: the same command, the same output and
exit code, without the imports. It serves only your user, runs only the code it imported
(after an upgrade or an edit, commands run cold until a new one is up) and leaves after
FERRY_WARM_IDLE seconds without a command (default 600).
\b
Off: FERRY_WARM=0, or FERRY_PREFECT=ephemeral (CI jobs that must leave nothing running)
unless FERRY_WARM=1.
\b
Examples:
  ferry warm status -o json
  ferry warm stop
"""

app = typer.Typer(help=HELP, no_args_is_help=True)


@app.command("status")
def status(fmt: OutputOpt = out.Format.text) -> None:
    """The warm processes of this user: PID, socket, and whether they run the current code."""
    out.use(fmt)
    from orchestrator import zygote

    procs = zygote.running()
    on = zygote.enabled(here=False)
    data = {"enabled": on, "dir": str(zygote.warm_dir()), "processes": procs}
    lines = [
        f"warm start {'on' if data['enabled'] else 'off'} ({data['dir']})",
        *(
            f"  pid {p['pid']}: {p['socket']}"
            + (" (starting)" if p.get("starting") else "")
            + ("" if p["current"] else " (older code: leaves when idle)")
            for p in procs
        ),
    ]
    if not procs:
        lines.append("  no warm process running (the next command starts one)")
    out.result(data, "\n".join(lines))


@app.command("stop")
def stop(fmt: OutputOpt = out.Format.text) -> None:
    """End every warm process of this user now (commands in progress finish)."""
    out.use(fmt)
    from orchestrator import zygote

    pids = zygote.stop_all()
    text = f"stopped {len(pids)} warm process(es)" + (f": {pids}" if pids else "")
    out.result({"stopped": pids}, text)
