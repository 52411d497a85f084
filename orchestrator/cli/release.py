"""`ferry release`: build release packages into the DML, check them in, list and show them
(with their service validation per environment), and sign user acceptance off."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import FerryError, NotFound

if TYPE_CHECKING:
    from orchestrator.cms.models import Release

app = typer.Typer(
    help="Build release packages from release specs, check them in, list and show them.",
    no_args_is_help=True,
)

# orchestrator.catalog.STATUSES, spelled out for `list --status`'s help: importing the
# catalog (SQLAlchemy, the DML) just to word a help line would slow every `ferry release`
# command's start; tests/unit/test_cli_startup.py checks the two agree.
STATUSES = ("registered", "checked-in", "deployed", "withdrawn")


@app.command()
def build(
    spec: Annotated[Path, typer.Argument(help="release spec (YAML)")],
    version: Annotated[str | None, typer.Option(help="override the spec's version")] = None,
    without: Annotated[
        list[str] | None,
        typer.Option("--without", metavar="UNIT", help="leave this unit out (repeatable)"),
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Build SPEC into a signed package in the DML, registered (not yet deployable)."""
    out.use(fmt)
    from orchestrator import catalog

    res = catalog.build_release(spec, version=version, without=without or [], progress=out.progress)
    from orchestrator import ci

    ci.publish({"release": res["release"], "digest": res["digest"]})
    verb = "built and stored" if res["new"] else "already in the DML (same digest; nothing changed)"
    out.result(
        res,
        f"{res['release']} {verb}\n"
        f"  digest   {res['digest']}\n"
        f"  status   {res['status']}\n"
        f"  files    {res['files']} in units {', '.join(res['units'])} "
        f"({res['size']} bytes; archive {res['archive_size']} bytes)\n"
        f"  archive  {res['archive_digest']}\n"
        f"  signed   by DML key {res['key_id']}",
    )


@app.command()
def checkin(
    release: Annotated[str, typer.Argument(help="NAME@VERSION")],
    rfc: Annotated[str, typer.Option("--rfc", help="the authorizing RFC (12 or RFC-12)")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Check a registered release in (deployable); needs an RFC covering the checkin stage."""
    out.use(fmt)
    from orchestrator import catalog
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    settings = get_settings()
    with db.session_scope() as session:
        before = catalog.get(session, release).status
        rel = catalog.checkin(session, release, rfc, settings.actor, datetime.now(UTC))
        data = _release_dict(rel) | {"changed": before != rel.status}
    out.result(
        data,
        f"{release} checked in under RFC-{rel.checked_in_rfc}"
        if data["changed"]
        else f"{release} is already {rel.status} (nothing changed)",
    )


@app.command("list")
def list_(
    status: Annotated[
        str | None, typer.Option(help=f"only this status: {', '.join(STATUSES)}")
    ] = None,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Releases the CMS knows, with status and package digest."""
    out.use(fmt)
    from orchestrator import catalog
    from orchestrator.cms import db

    with db.session_scope() as session:
        rows = [_release_dict(r) for r in catalog.list_releases(session, status)]
    lines = [f"{r['release']:<30} {r['status']:<11} {r['digest']}" for r in rows]
    out.result({"releases": rows}, "\n".join(lines) or "no releases")


@app.command()
def show(
    release: Annotated[str, typer.Argument(help="NAME@VERSION")],
    files: Annotated[bool, typer.Option("--files", help="list every file")] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """A release: CMS status and history, and its verified package in the DML."""
    out.use(fmt)
    from dml.store import DML
    from orchestrator import catalog
    from orchestrator.change import promotion, release_evidence
    from orchestrator.cms import audit, db

    lifecycle = promotion.load_lifecycle()
    with db.session_scope() as session:
        rel = catalog.get(session, release)
        data: dict[str, Any] = _release_dict(rel)
        data["history"] = audit.history(session, "release", release)
        data["environments"] = release_evidence.environments(session, rel, lifecycle)
    try:
        pkg = DML.from_settings().open(release, verify_archive=False)
        data["package"] = {
            "units": pkg.units,
            "files": len(pkg.files),
            "size": sum(f.size for f in pkg.files),
            "archive_digest": "sha256:" + pkg.archive_sha256,
            "manifest_digest": pkg.manifest_digest,
            "key_id": pkg.key_id,
            "provenance": pkg.provenance,
            **({"file_list": [f.__dict__ for f in pkg.files]} if files else {}),
        }
    except (FerryError, NotFound) as exc:
        data["package"] = {"error": exc.message}

    def render() -> None:
        p = data["package"]
        out.stdout.print(
            f"{release}  [{data['status']}]  {data['digest']}", highlight=False, markup=False
        )
        if "error" in p:
            out.stdout.print(f"  package: {p['error']}", highlight=False, markup=False)
        else:
            out.stdout.print(
                f"  units {', '.join(p['units'])}; {p['files']} files, {p['size']} bytes; "
                f"signed by {p['key_id']}",
                highlight=False,
                markup=False,
            )
            for f in p.get("file_list", []):
                out.stdout.print(
                    f"  {f['mode']:o} {f['size']:>10} {f['sha256'][:12]} {f['path']}",
                    highlight=False,
                    markup=False,
                )
        for env, e in data["environments"].items():
            _print_environment(env, e)
        for ev in data["history"]:
            out.stdout.print(
                f"  {ev['at']} {ev['actor']}: {ev['action']}", highlight=False, markup=False
            )

    out.result(data, render)


def _print_environment(env: str, e: dict[str, Any]) -> None:
    ran = ", ".join(f"#{d['id']} {d['status']}" for d in e["deployments"]) or "never deployed"
    tests = ", ".join(f"{n} {'passed' if ok else 'FAILED'}" for n, ok in e["acceptance"].items())
    word = "promotable" if e["promotable"] else "not promotable"
    lines = [f"  {env}: {ran}; {word}" + (" (a pilot wave first)" if e["needs_pilot_wave"] else "")]
    if tests:
        lines.append(f"    acceptance: {tests}")
    if e["sign_offs"]:
        lines.append(f"    user acceptance signed off by {', '.join(e['sign_offs'])}")
    lines += [f"    missing: {why}" for why in e["missing"]]
    for line in lines:
        out.stdout.print(line, highlight=False, markup=False)


@app.command()
def accept(
    release: Annotated[str, typer.Argument(help="NAME@VERSION")],
    env: Annotated[str, typer.Option("--env", help="the environment it was accepted in")],
    comment: Annotated[str, typer.Option("--comment", help="what was accepted (evidence)")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Sign user acceptance off for a release in ENV (not by the RFC's requester)."""
    out.use(fmt)
    from orchestrator import catalog
    from orchestrator.change import release_evidence
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    with db.session_scope() as session:
        rel = catalog.get(session, release)
        data = release_evidence.sign_off(
            session, rel, env, actor=get_settings().actor, comment=comment, now=datetime.now(UTC)
        )
    out.result(
        data,
        f"{release}: user acceptance in {env} signed off by {data['actor']}"
        if data["changed"]
        else f"{release}: {data['actor']} already signed off user acceptance in {env}",
    )


@app.command()
def withdraw(
    release: Annotated[str, typer.Argument(help="NAME@VERSION")],
    reason: Annotated[str, typer.Option(help="why (kept in the audit log)")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Withdraw a release: never deployed again; its package stays in the DML."""
    out.use(fmt)
    from orchestrator import catalog
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    with db.session_scope() as session:
        rel = catalog.withdraw(session, release, get_settings().actor, reason)
        data = _release_dict(rel)
    out.result(data, f"{release} withdrawn")


def _release_dict(rel: Release) -> dict[str, Any]:
    return {
        "release": rel.ref,
        "name": rel.name,
        "version": rel.version,
        "status": rel.status,
        "digest": rel.digest,
        "created_by": rel.created_by,
        "created_at": rel.created_at,
        "checked_in_at": rel.checked_in_at,
        "checked_in_rfc": rel.checked_in_rfc,
    }
