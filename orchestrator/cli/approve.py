"""`ferry approve ID`: decide a deployment's manual milestone (a wave with `approve: true`)."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

HELP = """Approve (or --reject) the manual milestone a running deployment waits at.

\b
A plan wave written `{hosts: 3, approve: true}` pauses its deployment's flow run after the
wave's milestone passes. The approver is you (FERRY_USER): someone with a role in the
change models, not the person who started the deployment. Approving continues with the
next wave; rejecting backs out every touched host. Both go to the audit log. The same
decision can be given in Prefect's UI (resume the paused flow run).
\b
Examples:
  ferry approve 42
  ferry approve 42 --reject --comment "error rate up on the canary"
"""


def register(app: typer.Typer) -> None:
    app.command(name="approve", help=HELP)(approve)


def approve(
    deployment_id: Annotated[str, typer.Argument(help="the waiting deployment (ferry status)")],
    reject: Annotated[bool, typer.Option("--reject", help="reject: back it out")] = False,
    comment: Annotated[str, typer.Option("--comment", "-m", help="why, for the record")] = "",
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.cms import deployments
    from orchestrator.errors import BadInput
    from orchestrator.prefect_env import configure_prefect
    from orchestrator.settings import get_settings

    settings = get_settings()
    rec = deployments.load(settings.cms_url, deployments.parse_deployment_id(deployment_id))
    waiting = rec.evidence.get("awaiting_approval")
    if not waiting:
        raise BadInput(f"deployment {rec.id} ({rec.status}) is not waiting for an approval")
    configure_prefect(progress=out.progress)
    from orchestrator.prefect_deployments import resume_paused

    decision = {"approve": not reject, "approver": settings.actor, "comment": comment}
    run_name = resume_paused(rec.id, decision)
    word = "rejected" if reject else "approved"
    data = {"deployment": rec.id, "wave": waiting["wave"], "flow_run": run_name, **decision}
    text = (
        f"deployment {rec.id}: manual milestone {waiting['wave']} {word} by {settings.actor} "
        f"(flow run {run_name}); the run checks that you may decide it"
    )
    out.result(data, text)
