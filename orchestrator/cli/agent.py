"""`ferry agent`: the pull agents on hosts: install, status, nudge, revoke (method: pull)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt

app = typer.Typer(
    help="Pull agents on hosts: install (over SSH), status, nudge, revoke.", no_args_is_help=True
)


def _targets(plan_path: Path, inventory: Path | None):  # type: ignore[no-untyped-def]
    from orchestrator.errors import SpecError
    from orchestrator.inventory import inventory_path, load_inventory
    from orchestrator.plan import load_plan
    from orchestrator.settings import get_settings

    plan = load_plan(plan_path)
    if plan.pull is None:
        raise SpecError(
            str(plan_path), "pull", "the plan has no pull settings",
            "add method: pull and pull: {server: https://ADDR:PORT}",
        )  # fmt: skip
    inv_file = inventory_path(
        override=inventory, plan_inventory=plan.inventory, default=get_settings().inventory,
        plan_file=str(plan_path),
    )  # fmt: skip
    inv = load_inventory(inv_file)
    hosts = inv.select(plan.targets)
    roots = {h.name: (plan.deploy_root or h.deploy_root).rstrip("/") or "/" for h in hosts}
    return plan, inv, hosts, roots


@app.command()
def install(
    plan_path: Annotated[Path, typer.Option("--plan", help="the deploy plan (method: pull)")],
    inventory: Annotated[
        Path | None, typer.Option("--inventory", "-i", help="inventory file (beats the plan's)")
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Install the agent on the plan's hosts over SSH: pin the DML key and CA, issue each
    host's token, start the daemon."""
    out.use(fmt)
    from dml.store import DML
    from orchestrator import pullagents
    from orchestrator.dmlserver import tls
    from orchestrator.errors import FerryError
    from orchestrator.settings import get_settings

    plan, inv, hosts, roots = _targets(plan_path, inventory)
    settings = get_settings()
    dml = DML.from_settings()
    dml.ensure_keys()
    ca = tls.ensure_ca(settings.home).read_text()
    assert plan.pull is not None
    results = pullagents.install(
        settings.cms_url, hosts, inv.ssh, roots,
        pull=plan.pull.model_dump(mode="json"), key_hex=dml.public_key_bytes().hex(),
        rotations=dml.rotations(), ca_pem=ca, progress=out.progress,
    )  # fmt: skip
    bad = [r for r in results if not r["installed"]]
    if bad:  # one error (exit 1, as an unreachable host is for push), every host's result in it
        raise FerryError(
            f"{len(bad)} of {len(results)} host(s) without an agent; first: {bad[0]['host']}: "
            f"{bad[0]['error']}",
            details={"installed": results},
        )
    out.result({"installed": results}, f"agent installed on {len(results)} host(s)")


@app.command()
def status(
    environment: Annotated[str | None, typer.Argument(help="only this environment's hosts")] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Per host: last heartbeat, what it runs, what it should run, its last report."""
    out.use(fmt)
    from orchestrator import pullstate
    from orchestrator.settings import get_settings

    url = get_settings().cms_url
    names = None
    if environment is not None:
        names = sorted(
            h for h, d in pullstate.desired_all(url).items() if d.environment == environment
        )
    rows = pullstate.status(url, names)

    def line(r: dict) -> str:  # type: ignore[type-arg]
        last = r["last_report"] or {}
        beat = "never" if r["heartbeat_age_s"] is None else f"{r['heartbeat_age_s']:.0f}s ago"
        pend = f", pending {r['pending']}" if r["pending"] else ""
        said = ("ok" if last.get("ok") else "FAILED") if last else ""
        return (
            f"{r['host']}: heartbeat {beat}, running {r['running']}, desired {r['desired']}"
            f"{pend}, last report {last.get('step')} {said}"
            + (" (revoked)" if r["revoked"] else "")
        )

    out.result({"agents": rows}, "\n".join(line(r) for r in rows) or "no pull agents")


@app.command()
def nudge(
    host: Annotated[str, typer.Argument(help="the host whose agent checks now")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Make the host's agent look at its desired state now."""
    out.use(fmt)
    from orchestrator import pullstate
    from orchestrator.settings import get_settings

    n = pullstate.nudge(get_settings().cms_url, host)
    out.result({"host": host, "nudge": n}, f"{host}: nudged")


@app.command()
def revoke(
    host: Annotated[str, typer.Argument(help="the host whose token stops working")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Revoke the host's token: the DML server refuses it from now on."""
    out.use(fmt)
    from orchestrator import pullstate
    from orchestrator.settings import get_settings

    pullstate.revoke(get_settings().cms_url, host)
    out.result({"host": host, "revoked": True}, f"{host}: token revoked")
