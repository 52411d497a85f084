"""`ferry deploy`: plan, authorize and push a release to hosts, wave by wave."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

if TYPE_CHECKING:
    from orchestrator.cms.locks import HostLocks
    from orchestrator.preparation import DeployRequest, Prepared
    from orchestrator.settings import Settings

HELP = """Deploy RELEASE (name@version, from the DML) by the deploy PLAN, under an authorized RFC.

\b
Steps per host:  stage → verify → snapshot → install → activate → check
Backout per host: revert → reactivate → restore → recheck
\b
Every hook, config template and check is rendered for every host before anything is
recorded: a template typo is exit 2, and the dry run shows each host's exact commands
(`--dry-run -o json`; secret-looking vars redacted) and touches nothing: no host, no CMS
record. Without --dry-run the deployment is recorded, then run from that record, every
step journaled. Ctrl-C / SIGTERM stops at the next safe point and backs out.
\b
Inventory, in this order: --inventory, the plan's `inventory:`, FERRY_INVENTORY/ferry.toml.
\b
Examples:
  ferry deploy deploy_plans/shop.yaml -r shop@1.4.0 --dry-run
  ferry deploy deploy_plans/shop.yaml -r shop@1.4.0 --rfc 12 -o json
\b
Exit codes: 0 succeeded, 1 internal error (backed out first; crash log named), 2 bad
input, 3 refused or halted by the change gate, 4 milestone failed and backed out,
5 backout incomplete (hosts need remediation), 6 integrity failure (a host refused the
package: signature, pinned key or checksum; backed out).
"""


def register(app: typer.Typer) -> None:
    app.command(name="deploy", help=HELP)(deploy)


def deploy(
    plan: Annotated[Path, typer.Argument(help="deploy plan (YAML), e.g. deploy_plans/…")],
    release: Annotated[
        str, typer.Option("--release", "-r", metavar="NAME@VERSION", help="the release, in the DML")
    ],
    rfc: Annotated[str | None, typer.Option("--rfc", help="the authorizing RFC (id)")] = None,
    inventory: Annotated[
        Path | None, typer.Option("--inventory", "-i", help="inventory file (beats the plan's)")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the rollout only")] = False,
    via: Annotated[
        str,
        typer.Option(
            "--via",
            metavar="local|prefect",
            help="'local' runs the flow in this process; 'prefect' submits it to a Prefect "
            "work pool (ferry prefect register) and follows it: same progress and exit code",
        ),
    ] = "local",
    pool: Annotated[str, typer.Option("--pool", help="work pool for --via prefect")] = "ferry",
    wait_lock: Annotated[
        str | None,
        typer.Option(
            "--wait-lock",
            metavar="DURATION",
            help="when another run holds these hosts, wait up to DURATION (e.g. 10m) for it "
            "instead of being refused (exit 3)",
        ),
    ] = None,
    hosts: Annotated[
        str | None,
        typer.Option("--hosts", help="only these of the plan's hosts (names, groups, globs)"),
    ] = None,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", metavar="FILE", help="write a JUnit XML report to FILE"),
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.preparation import DeployRequest, prepare
    from orchestrator.settings import get_settings

    if via not in ("local", "prefect"):
        from orchestrator.errors import BadInput

        raise BadInput(f"--via {via!r}: expected 'local' (the default) or 'prefect'")
    settings = get_settings()
    wait = _wait_lock(wait_lock)
    request = DeployRequest(
        plan_path=plan,
        release=release,
        rfc=rfc,
        actor=settings.actor,
        inventory=inventory,
        hosts=hosts,
    )
    prepared = prepare(request, settings)  # every bad input is exit 2 here; nothing recorded
    rollout = prepared.rollout
    if dry_run:
        data = dry_run_report(rollout)
        out.result(data, lambda: print_rollout(data))
        return
    from orchestrator.prefect_env import configure_prefect

    # before the record: a Prefect that cannot start leaves no planned deployment behind
    where = configure_prefect(progress=out.progress)
    if via == "prefect":
        from orchestrator.prefect_deployments import require

        require(pool)
    from orchestrator.cms.locks import HostLocks

    # one run per host: the locks are taken before the record and before any host is
    # touched; refused (exit 3, naming the holder) leaves nothing recorded
    locks = HostLocks(
        settings.cms_url,
        [h.host for h in rollout.hosts()],
        purpose="deploy",
        actor=settings.actor,
        release=rollout.release,
    )
    locks.acquire(wait=wait, progress=out.progress)
    try:
        prepared = _fresh(prepared, request, settings, locks)
        _run(prepared, settings, locks, where, via, pool, hosts, junit)
    finally:
        locks.release()


def _wait_lock(text: str | None) -> float:
    if text is None:
        return 0.0
    from orchestrator.errors import BadInput
    from orchestrator.plan import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise BadInput(f"--wait-lock {text!r}: {exc} (e.g. 30s, 10m, 1h)") from None


def _fresh(
    prepared: Prepared, request: DeployRequest, settings: Settings, locks: HostLocks
) -> Prepared:
    """The rollout's priors are the hosts' baselines as they are now that we hold the hosts:
    a run we waited behind moved them, and a prior must be what the host runs."""
    from orchestrator.cms.deployments import host_baselines
    from orchestrator.preparation import prepare

    rollout = prepared.rollout
    names = [h.host for h in rollout.hosts()]
    now = host_baselines(settings.cms_url, names)
    if all(now.get(h.host) == h.prior for h in rollout.hosts()):
        return prepared
    out.progress("the hosts' baselines changed while waiting for their lock: planning again")
    again = prepare(request, settings)
    if sorted(h.host for h in again.rollout.hosts()) != sorted(names):
        locks.hosts = sorted({*locks.hosts, *(h.host for h in again.rollout.hosts())})
        locks.acquire()
    return again


def _run(
    prepared: Prepared,
    settings: Settings,
    locks: HostLocks,
    where: str,
    via: str,
    pool: str,
    hosts: str | None,
    junit: Path | None,
) -> None:
    from orchestrator.preparation import open_deployment

    rollout = prepared.rollout
    record = open_deployment(prepared, settings)
    locks.bind(record.id)
    out.progress(
        f"deployment {record.id}: {rollout.release} to {len(rollout.hosts())} host(s) of "
        f"{rollout.environment} in {len(rollout.waves)} wave(s) "
        + (f"under RFC-{prepared.rfc_id}" if prepared.rfc_id is not None else "with no RFC")
        + (f", narrowed by --hosts {hosts}" if hosts else "")
        + f" (Prefect {where})"
    )
    if via == "prefect":
        _via_prefect(record, pool, settings, junit)
        return
    from orchestrator.flows import run_deployment

    try:
        run_deployment(record.id)
    except Exception:
        # the flow never got to run it (it ends its own errors): nothing touched a host
        from orchestrator.lifecycle import Status

        if record.load().status == Status.PLANNED:
            record.move(Status.ABORTED, evidence={"reason": "the flow could not start"})
        raise
    finish(record.id, settings, junit=junit)


def _via_prefect(record: Any, pool: str, settings: Any, junit: Path | None = None) -> None:
    """Submit the recorded deployment to the pool, relay its log, end as if run here."""
    from orchestrator.errors import BackoutIncomplete
    from orchestrator.lifecycle import Status
    from orchestrator.prefect_deployments import follow, submit

    try:
        run = submit(record.id, pool)
    except Exception:
        record.move(Status.ABORTED, evidence={"reason": "could not submit it to Prefect"})
        raise
    out.progress(f"submitted to work pool {pool} as flow run {run.name} ({run.id})")
    state = follow(run.id, out.progress)
    rec = record.load()
    if rec.open:  # the worker ended without finishing the record (it died, or was cancelled)
        raise BackoutIncomplete(
            f"flow run {run.name} ended {state.type.value} but deployment {rec.id} is still "
            f"{rec.status}: run `ferry remediate recover {rec.id}`"
        )
    finish(record.id, settings, junit=junit)


def finish(deployment_id: int, settings: object, junit: Path | None = None) -> None:
    """Print the recorded outcome and exit with its status's code."""
    from orchestrator import lifecycle
    from orchestrator.cms import deployments
    from orchestrator.report import deployment_report

    url = settings.cms_url  # type: ignore[attr-defined]
    rec = deployments.load(url, deployment_id)
    report = deployment_report(rec, deployments.journal_rows(url, deployment_id))
    code = lifecycle.exit_code(rec.status)
    hand_on(report, list(rec.latest("outcomes").values()), int(code), junit)
    if rec.status in (lifecycle.Status.REFUSED, lifecycle.Status.HALTED):
        out.error(report, report.get("message") or f"deployment {rec.id}: {rec.status}")
    elif rec.status == lifecycle.Status.ABORTED:
        out.error(
            report,
            f"internal error: {report.get('reason')} — every touched host was backed out first "
            f"(traceback: {report.get('crash_log')})",
        )
    else:
        out.result(report, lambda: print_report(report))
    raise typer.Exit(int(code))


def hand_on(report: dict, outcomes: list[dict], code: int, junit: Path | None) -> None:
    """The JUnit report, and the CI system's outputs, summary and annotations."""
    from orchestrator import ci

    if junit is not None:
        from orchestrator import junit as junit_xml

        junit_xml.write(junit, junit_xml.deployment_suite({**report, "outcomes": outcomes}))
    errors = [
        (f"ferry deploy: {host}", f"{h['failure']['step']}: {h['failure']['reason']}")
        for host, h in report["hosts"].items()
        if "failure" in h
    ]
    errors += [
        (f"ferry deploy: milestone {m['wave']}", m["reason"])
        for m in report["milestones"]
        if not m["passed"]
    ]
    if code and not errors:
        errors = [("ferry deploy", str(report.get("message") or report.get("reason") or ""))]
    ci.publish(
        {
            "deployment_id": report["id"],
            "status": report["status"],
            "release": report["release"],
            "digest": report["digest"],
            "rfc": report["rfc"],
            "exit_code": code,
        },
        summary=summary_markdown(report),
        errors=errors,
    )


def summary_markdown(report: dict) -> str:
    lines = [
        f"### Ferry deployment {report['id']}: {report['status']}",
        "",
        f"{report['release']} (`{report['digest'][:19]}…`) to **{report['environment']}**"
        + (f" under RFC-{report['rfc']}" if report["rfc"] else ""),
        "",
        "| host | status | release | failure |",
        "|---|---|---|---|",
    ]
    for host, h in report["hosts"].items():
        fail = h.get("failure")
        why = f"{fail['step']}: {fail['reason']}" if fail else ""
        lines.append(f"| {host} | {h['status']} | {h['release'] or ''} | {why.replace('|', '/')} |")
    for m in report["milestones"]:
        lines.append("")
        lines.append(
            f"- milestone {m['wave']}: {'passed' if m['passed'] else 'FAILED'}: {m['reason']}"
        )
    return "\n".join(lines)


def dry_run_report(rollout: object) -> dict:
    from orchestrator.rollout import Rollout

    assert isinstance(rollout, Rollout)
    d = rollout.to_dict()
    return {
        "id": None,
        "status": "dry-run",
        "release": d["release"],
        "digest": d["digest"],
        "environment": d["environment"],
        "strategy": d["strategy"],
        "plan_hash": d["plan_hash"],
        "waves": d["waves"],
        "hosts": {
            name: {
                "release": rollout.release,
                "prior": (h["prior"] or {}).get("release"),
                "steps": h["steps"],
                "address": h["address"],
                "port": h["port"],
                "deploy_root": h["deploy_root"],
                "commands": {
                    "forward": _with_agent(h["forward"], d["release_id"]),
                    "checks": h["checks"],
                    **({"acceptance": h["acceptance"]} if h.get("acceptance") else {}),
                    "backout": _with_agent(
                        h["backout"], (h["prior"] or {}) and _rid(rollout, name)
                    ),
                },
            }
            for name, h in d["hosts"].items()
        },
        "notes": d["notes"],
    }


def _rid(rollout: object, host: str) -> str | None:
    prior = rollout.host(host).prior  # type: ignore[attr-defined]
    return prior.release_id if prior else None


def _with_agent(commands: dict, release_id: str | None) -> dict:
    """Each step's command, and the host agent's operation it calls (with what id)."""
    from orchestrator.steps import STEPS

    out = {}
    for step, cmd in commands.items():
        op = STEPS[step].agent
        if op is None or (op == "config" and not cmd.get("config")):
            out[step] = cmd
            continue
        target = f"--id {release_id}" if release_id else "--none"
        out[step] = {"agent": f"{op} {target}", **cmd}
    return out


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
