"""`ferry deploy`: plan, authorize and push a release to hosts, wave by wave."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import AuthorizationRefused, ExitCode

STATUS_EXIT = {
    "succeeded": ExitCode.OK,
    "refused": ExitCode.REFUSED,
    "backed-out": ExitCode.BACKED_OUT,
}

HELP = """Deploy RELEASE (name@version, from the DML) by the deploy PLAN, under an authorized RFC.

\b
Steps per host:  stage → verify → snapshot → install → activate → check
Backout per host: revert → reactivate → restore → recheck
\b
The dry run (--dry-run) prints the exact waves, steps and prior baselines and touches
nothing: no host, no CMS record. Without --dry-run every step is journaled in the CMS.
Ctrl-C / SIGTERM stops at the next safe point and backs out.
\b
\b
Examples:
  ferry deploy deploy_plans/shop.yaml -r shop@1.4.0 --dry-run
  ferry deploy deploy_plans/shop.yaml -r shop@1.4.0 --rfc 12 -o json
\b
Exit codes: 0 succeeded, 2 bad input, 3 refused by the change gate, 4 milestone failed and
backed out, 5 backout incomplete (hosts need remediation), 6 integrity failure.
"""


def register(app: typer.Typer) -> None:
    app.command(name="deploy", help=HELP)(deploy)


def deploy(
    plan: Annotated[Path, typer.Argument(help="deploy plan (YAML), e.g. deploy_plans/…")],
    release: Annotated[str, typer.Option("--release", "-r", help="NAME@VERSION in the DML")],
    rfc: Annotated[str | None, typer.Option("--rfc", help="the authorizing RFC (id)")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the rollout only")] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.deployment import DeploymentRun, DeployRequest
    from orchestrator.settings import get_settings

    settings = get_settings()
    request = DeployRequest(plan_path=plan, release=release, rfc=rfc, actor=settings.actor)
    run = DeploymentRun(request, settings, progress=out.progress)
    rollout = run.prepare()
    if dry_run:
        data = dry_run_report(rollout)
        out.result(data, lambda: print_rollout(data))
        return
    out.progress(
        f"deploying {rollout.release} to {len(rollout.hosts())} host(s) of "
        f"{rollout.environment} in {len(rollout.waves)} wave(s) under RFC {rfc}"
    )
    from orchestrator.prefect_env import configure_prefect

    out.progress(f"starting the flow (Prefect {configure_prefect()})")
    from orchestrator.flows import run_deploy_flow

    try:
        status = run_deploy_flow(run)
    except AuthorizationRefused as exc:
        if run.deployment_id is None:
            raise
        report = run.report("refused") | {"reasons": exc.reasons}
        out.error(report, exc.message)
        raise typer.Exit(int(ExitCode.REFUSED)) from None
    report = run.report(status)
    out.result(report, lambda: print_report(report))
    code = STATUS_EXIT.get(status)
    if code is None:
        code = ExitCode.BACKOUT_INCOMPLETE if report["needs_remediation"] else ExitCode.INTERNAL
    raise typer.Exit(int(code))


def dry_run_report(rollout: object) -> dict:
    from orchestrator.planner import Rollout

    assert isinstance(rollout, Rollout)
    d = rollout.to_dict()
    return {
        "id": None,
        "status": "dry-run",
        "release": d["release"],
        "digest": d["digest"],
        "environment": d["environment"],
        "strategy": d["strategy"],
        "waves": d["waves"],
        "hosts": {
            h.host: {
                "release": rollout.release,
                "prior": h.prior.release if h.prior else None,
                "steps": list(h.steps),
            }
            for h in rollout.hosts()
        },
        "notes": d["notes"],
    }


def print_rollout(data: dict) -> None:
    out.stdout.print(
        f"Rollout of {data['release']} ({data['digest'][:19]}…) to {data['environment']}, "
        f"{data['strategy']}, {len(data['waves'])} wave(s):",
        highlight=False,
    )
    for i, wave in enumerate(data["waves"], start=1):
        out.stdout.print(f"  wave {i}: {len(wave)} host(s)", highlight=False)
        for host in wave:
            h = data["hosts"][host]
            out.stdout.print(
                f"    {host}: {' → '.join(h['steps'])}   (prior: {h['prior'] or 'none'})",
                highlight=False,
            )
    for note in data["notes"]:
        out.stdout.print(f"  note: {note}", highlight=False)


def print_report(report: dict) -> None:
    out.stdout.print(
        f"deployment {report['id']}: {report['status']} ({report['release']}, "
        f"{report['bytes_sent'] / 1e6:.1f} MB sent)",
        highlight=False,
    )
    for host, h in report["hosts"].items():
        extra = f"  [{h['failure']['step']}: {h['failure']['reason']}]" if "failure" in h else ""
        out.stdout.print(f"  {host}: {h['status']} → {h['release']}{extra}", highlight=False)
    if report["needs_remediation"]:
        out.stdout.print(
            "hosts needing remediation: " + ", ".join(report["needs_remediation"]),
            highlight=False,
        )
