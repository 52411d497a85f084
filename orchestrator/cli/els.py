"""`ferry els`: early life support of succeeded deployments (schedule `ferry els run` from
cron or a pipeline; it decides for itself what is due)."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import ExitCode

app = typer.Typer(
    help="Early life support: re-run deployments' ELS checks during their period, then "
    "record the outcome.",
    no_args_is_help=True,
)

RUN_HELP = """Re-run the ELS checks (the plan's `els: {period, every, checks}`) of every
deployment still under early life support, when they are due (every `every`, during
`period` after the deployment succeeded); once the period is over, record its outcome
(passed, failed or unchecked). A failed check is recorded against the deployment and
`ferry remediate backout ID` is offered.

\b
Exit codes: 0 every check run passed (or nothing was due); 5 a check failed on some host.
\b
Examples:
  */10 * * * *  ferry els run            (cron)
  ferry els run --deployment 7 -o json
"""


@app.command("run", help=RUN_HELP)
def run(
    deployment: Annotated[
        str | None, typer.Option("--deployment", "-d", help="only this deployment")
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.els_runner import els_run
    from orchestrator.settings import get_settings

    data = els_run(get_settings(), out.progress, deployment)
    lines = []
    for r in data["deployments"]:
        text = f"deployment {r['deployment']}: {r['action']}"
        if r.get("failed"):
            text += f" — FAILED on {', '.join(r['failed'])}; next: {r['next']}"
        elif r["action"] == "run":
            text += " — every check passed"
        if r.get("outcome"):
            text += f" — outcome {r['outcome']['outcome']}"
        lines.append(text)
    out.result(data, "\n".join(lines) or "no deployment is under early life support")
    if any(r.get("failed") for r in data["deployments"]):
        raise typer.Exit(int(ExitCode.BACKOUT_INCOMPLETE))
