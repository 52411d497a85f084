"""`ferry dml`: the Definitive Media Library's key, contents, integrity and clean-up."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import FerryError, IntegrityError

app = typer.Typer(
    help="The Definitive Media Library: key, list, show, verify, gc.", no_args_is_help=True
)


@app.command()
def keygen(fmt: OutputOpt = out.Format.text) -> None:
    """Make the DML's ed25519 signing key pair (once; an existing key is kept)."""
    out.use(fmt)
    from dml.store import DML

    store = DML.from_settings()
    created = store.ensure_keys()
    data = {
        "created": created,
        "key_id": store.key_id(),
        "public_key_hex": store.public_key_bytes().hex(),
        "public_key_file": str(store.keys_dir / "dml.pub"),
    }
    verb = "made a new" if created else "kept the existing"
    out.result(
        data,
        f"{verb} DML signing key {data['key_id']}\n"
        f"  public key {data['public_key_hex']}\n  ({data['public_key_file']}: pin this on hosts)",
    )


@app.command("list")
def list_(fmt: OutputOpt = out.Format.text) -> None:
    """Every release in the DML with its digest (signature and manifest verified)."""
    out.use(fmt)
    from dml.store import DML

    store = DML.from_settings()
    rows = []
    for release in store.releases():
        try:
            pkg = store.open(release, verify_archive=False)
            rows.append(
                {
                    "release": release,
                    "digest": pkg.digest,
                    "files": len(pkg.files),
                    "archive_size": pkg.archive_size,
                    "ok": True,
                }
            )
        except FerryError as exc:
            rows.append({"release": release, "ok": False, "error": exc.message})
    lines = [
        f"{r['release']:<30} {r['digest']}  {r['files']} files"
        if r["ok"]
        else f"{r['release']:<30} BROKEN: {r['error']}"
        for r in rows
    ]
    out.result({"dml": str(store.root), "releases": rows}, "\n".join(lines) or "the DML is empty")


@app.command()
def show(
    release: Annotated[str, typer.Argument(help="NAME@VERSION")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """A release's verified manifest (archive checksum included)."""
    out.use(fmt)
    from dml.store import DML

    store = DML.from_settings()
    pkg = store.open(release)
    data = {
        "release": release,
        "index": store.index(release),
        "manifest": pkg.manifest,
        "archive_path": str(pkg.archive_path),
    }
    out.result(data, None)


@app.command()
def verify(
    deep: Annotated[
        bool, typer.Option("--deep", help="also unpack every archive and re-hash every file")
    ] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Re-hash every blob, check every signature; exit 6 naming each corrupt or missing item."""
    out.use(fmt)
    from dml.store import DML

    store = DML.from_settings()
    out.progress(f"verifying the DML at {store.root}{' (deep)' if deep else ''}")
    report = store.verify(deep=deep)
    data = {"dml": str(store.root), **report.to_dict()}
    if not report.ok:
        for p in report.problems:
            out.stderr.print(f"  {p['item']}: {p['problem']}", highlight=False)
        raise IntegrityError(
            f"the DML has {len(report.problems)} integrity problem(s); first: "
            f"{report.problems[0]['item']}: {report.problems[0]['problem']}",
            details=data,
        )
    out.result(
        data,
        f"DML intact: {report.checked['blobs']} blobs, {report.checked['releases']} releases "
        "verified",
    )


@app.command()
def gc(
    yes: Annotated[bool, typer.Option("--yes", help="delete (default: only list)")] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Blobs no release index and no CMS package references (dry run unless --yes)."""
    out.use(fmt)
    from dml.store import DML
    from orchestrator import catalog
    from orchestrator.cms import db

    store = DML.from_settings()
    with db.session_scope() as session:
        keep = catalog.referenced_digests(session)
    report = store.gc(keep=keep, delete=yes)
    data = {"dml": str(store.root), "deleted": yes, **report.to_dict()}
    n = len(report.unreferenced)
    text = (
        f"removed {len(report.removed)} unreferenced item(s)"
        if yes
        else f"{n} unreferenced item(s); run with --yes to remove them"
    )
    out.result(data, "\n".join([text, *(f"  {d}" for d in report.unreferenced)]))
