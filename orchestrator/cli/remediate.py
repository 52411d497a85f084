"""`ferry remediate`: the on-call commands: manual backout, crash recovery, drift audit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

app = typer.Typer(
    no_args_is_help=True,
    rich_markup_mode=None,
    help="On-call: backout, recover, drift audit. Start with `ferry status`; runbooks in "
    "docs/remediation.md.",
)

InventoryOpt = Annotated[
    Path | None,
    typer.Option(
        "--inventory",
        "-i",
        help="inventory file (default: the newest deployment's plan's, then FERRY_INVENTORY)",
    ),
]
PlanOpt = Annotated[
    Path | None,
    typer.Option(
        "--plan",
        help="run this plan's backout hooks instead of the ones recorded with the deployment",
    ),
]

BACKOUT_HELP = """Return every host DEPLOYMENT_ID touched to its own prior baseline, as recorded
for that deployment: for a deployment that succeeded and turned out bad, or one that failed
or was interrupted.

\b
It is a change: --rfc names an RFC authorizing deploy of the PRIOR release in that
environment (or an emergency RFC); repeat --rfc when hosts had different priors.
Per host: revert → reactivate → restore → recheck, then a read-back of `current` and
every file. It runs what the deployment recorded: the same hosts, reached the same way,
the backout commands rendered for each host's prior when it was planned (an edited plan
changes nothing; --plan FILE runs that file's hooks instead). Hosts already on their
prior are left as they are; a host now on a third release (by hand) is left alone and
named. Refused (exit 2) when a later deployment succeeded on its hosts: back that one out;
a deployment already backed out is left as it is (exit 0).
\b
Records: a new deployment (strategy backout) journals every step; host baselines follow
the restored hosts; the original deployment becomes backed-out (or failed, naming the
hosts that need remediation).
\b
Exit codes: 0 every host restored, 2 unknown deployment or bad input, 3 refused by the
change gate (nothing touched), 5 some hosts not restored (named, with their state).
\b
Example:
  ferry remediate backout 7 --rfc RFC-12
"""

RECOVER_HELP = """Finish DEPLOYMENT_ID after its process died (SIGKILL, crash, power): it is
planned/running with no finish. Reads the journal, asks every touched host what `current`
is, backs out each host not on its own prior baseline (with the recorded backout
commands, on the recorded hosts), and marks the deployment backed-out
(or failed, naming the hosts that need remediation). Its RFC follows.

\b
Needs no RFC: it completes the authorized change's remediation plan (audit events record
it). Safe to repeat: on a finished deployment it says so and changes nothing. Refused while
the deploying process is still alive on this machine (stop it with SIGTERM: it backs out
by itself), unless --force.
\b
Exit codes: 0 recovered (or nothing to do), 2 unknown deployment, still running or bad
input, 5 some hosts not restored (named, with their state).
\b
Example:
  ferry remediate recover 7
"""

DRIFT_HELP = """Audit hosts against the CMS: each host with a baseline is asked what `current`
is and whether its files match the signed manifest.

\b
States: ok; drifted (current is not the baseline's release); tampered (files differ from
the manifest: sizes always, every sha256 with --full); unreachable; unmanaged (in the
inventory, no baseline in the CMS: not contacted).
\b
Exit codes: 0 no drift, 5 drifted or unreachable hosts, 6 files differ from the manifest
(6 wins over 5). Changes nothing on hosts.
\b
Examples:
  ferry remediate drift --env prod
  ferry remediate drift --env prod --full -o json
"""


def _actor() -> str:
    from orchestrator.settings import get_settings

    return get_settings().actor


@app.command("backout", help=BACKOUT_HELP)
def backout(
    deployment_id: Annotated[str, typer.Argument(help="the deployment to back out (ferry status)")],
    rfc: Annotated[
        list[str],
        typer.Option("--rfc", help="RFC authorizing deploy of the prior release (repeatable)"),
    ],
    plan: PlanOpt = None,
    keep_data: Annotated[
        bool,
        typer.Option("--keep-data", help="skip the plan's restore hook: keep data as it is now"),
    ] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.settings import get_settings
    from remediation.backout import BackoutRequest, back_out

    req = BackoutRequest(deployment_id, rfc, _actor(), plan, keep_data)
    outcome = back_out(req, get_settings(), out.progress)
    out.result(outcome.data, lambda: _print_hosts(outcome.data, "manual backout"))
    raise typer.Exit(outcome.exit_code)


@app.command("recover", help=RECOVER_HELP)
def recover(
    deployment_id: Annotated[str, typer.Argument(help="the interrupted deployment (ferry status)")],
    plan: PlanOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="recover although its process seems alive")
    ] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator.settings import get_settings
    from remediation.recover import RecoverRequest, recover

    req = RecoverRequest(deployment_id, _actor(), plan, force)
    outcome = recover(req, get_settings(), out.progress)
    out.result(outcome.data, lambda: _print_hosts(outcome.data, "recover"))
    raise typer.Exit(outcome.exit_code)


@app.command("drift", help=DRIFT_HELP)
def drift(
    env: Annotated[str | None, typer.Option("--env", "-e", help="only this environment")] = None,
    inventory: InventoryOpt = None,
    full: Annotated[
        bool, typer.Option("--full", help="re-hash every file (slower; catches same-size edits)")
    ] = False,
    junit: Annotated[
        Path | None,
        typer.Option("--junit", metavar="FILE", help="write a JUnit XML report (a case per host)"),
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    out.use(fmt)
    from orchestrator import ci
    from orchestrator.settings import get_settings
    from remediation.drift import audit_drift

    data = audit_drift(
        get_settings(), environment=env, inventory_path=inventory, full=full, progress=out.progress
    )
    if junit is not None:
        from orchestrator import junit as junit_xml

        junit_xml.write(junit, junit_xml.drift_suite(data))
    bad = {h: d for h, d in data["hosts"].items() if d["state"] not in ("ok", "unmanaged")}
    ci.publish(
        {"drift_exit_code": data["exit_code"], "drift_hosts_not_ok": len(bad)},
        summary="### Ferry drift audit\n\n"
        + "\n".join(f"- {h}: {d['state']}: {d['detail']}" for h, d in bad.items())
        if bad
        else "### Ferry drift audit: every managed host ok",
        errors=[(f"ferry drift: {h}", f"{d['state']}: {d['detail']}") for h, d in bad.items()],
    )
    out.result(data, lambda: _print_drift(data))
    raise typer.Exit(data["exit_code"])


def _p(text: str) -> None:
    out.stdout.print(text, highlight=False, markup=False)


def _print_hosts(data: dict[str, Any], what: str) -> None:
    """Restored hosts grouped by the release they are on; every other host by name."""
    if data.get("action") == "already-finished":
        _p(f"deployment {data['id']} already finished ({data['status']}): nothing changed")
        return
    _p(f"{what} of deployment {data.get('backs_out', data['id'])}: {data['status']}")
    on: dict[str, list[str]] = {}
    for host, h in data["hosts"].items():
        if h["restored"]:
            on.setdefault(h["prior"] or "no release (current removed)", []).append(host)
    for release, names in on.items():
        _p(f"  on {release} ({len(names)}): {', '.join(names)}")
    for host, h in data["hosts"].items():
        if not h["restored"]:
            _p(f"  ✗ {host}: NOT restored: {h['verdict']}: {h['error']} (current: {h['current']})")
    if data["needs_remediation"]:
        _p("hosts needing remediation: " + ", ".join(data["needs_remediation"]))


def _print_drift(data: dict[str, Any]) -> None:
    """Hosts grouped by state; the detail of every host that is not ok."""
    counts = ", ".join(f"{n} {state}" for state, n in data["counts"].items() if n)
    _p(f"drift audit{' (' + data['environment'] + ')' if data['environment'] else ''}: {counts}")
    ok = [h for h, d in data["hosts"].items() if d["state"] == "ok"]
    if ok:
        _p(f"  ok ({len(ok)}): {', '.join(ok)}")
    for host, h in data["hosts"].items():
        if h["state"] != "ok":
            _p(f"  {h['state']}: {host}: {h['detail']}")
            if h.get("next"):
                _p(f"    next: {h['next']}")
