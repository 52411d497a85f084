"""`ferry dml`: the Definitive Media Library's key, contents, integrity and clean-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import FerryError, IntegrityError

app = typer.Typer(
    help="The Definitive Media Library: key, list, show, verify, gc.", no_args_is_help=True
)
key_app = typer.Typer(
    help="The DML's signing key: show, export, import, rotate (docs/dml.md: team keys).",
    no_args_is_help=True,
)
app.add_typer(key_app, name="key")


def _key_data(store: object) -> dict:
    from dml.store import DML

    assert isinstance(store, DML)
    return {
        "key_id": store.key_id(),
        "public_key_hex": store.public_key_bytes().hex(),
        "where": str(store.keyring.where),
        "shared_file": store.keyring.key_file is not None,
        "rotations": len(store.rotations()),
    }


@key_app.command("show")
def key_show(fmt: OutputOpt = out.Format.text) -> None:
    """The signing key in use: its id, public key, where it is kept, its rotations."""
    out.use(fmt)
    from dml.store import DML

    data = _key_data(DML.from_settings())
    out.result(
        data,
        f"DML signing key {data['key_id']} ({data['where']}; {data['rotations']} rotation(s))\n"
        f"  public key {data['public_key_hex']}",
    )


@key_app.command("export")
def key_export(
    file: Annotated[Path, typer.Argument(help="where to write the key file (mode 0600)")],
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Write the signing key and its rotations to FILE, for another home or a CI secret
    (then FERRY_DML_KEY_FILE=FILE there, or `ferry dml key import FILE`)."""
    out.use(fmt)
    from dml.store import DML
    from orchestrator.errors import BadInput

    if file.exists():
        raise BadInput(f"{file}: already exists; export never overwrites a file")
    store = DML.from_settings()
    store.keyring.export(file)
    data = {**_key_data(store), "exported_to": str(file)}
    out.result(data, f"exported DML signing key {data['key_id']} to {file} (keep it secret)")


@key_app.command("import")
def key_import(
    file: Annotated[Path, typer.Argument(help="a key file from `ferry dml key export`")],
    replace: Annotated[
        bool, typer.Option("--replace", help="even if this DML's releases are signed by another")
    ] = False,
    fmt: OutputOpt = out.Format.text,
) -> None:
    """Make FILE's key this DML's signing key (its rotations too)."""
    out.use(fmt)
    from dml.store import DML

    store = DML.from_settings()
    result = store.keyring.import_(file, replace=replace, releases=len(store.releases()))
    data = {**_key_data(store), **result}
    out.result(data, f"this DML now signs with key {data['key_id']}")


@key_app.command("rotate")
def key_rotate(fmt: OutputOpt = out.Format.text) -> None:
    """A new signing key, signed by the old one: hosts pinning the old key accept it on
    their next deployment; earlier releases keep verifying."""
    out.use(fmt)
    from dml.store import DML

    store = DML.from_settings()
    result = store.keyring.rotate()
    data = {**_key_data(store), **result}
    out.result(
        data,
        f"rotated the DML signing key {result['old_key_id']} → {result['new_key_id']} "
        f"({result['where']}); hosts move to it on their next contact",
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


@app.command()
def serve(
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT to listen on")],
    insecure_http: Annotated[
        bool, typer.Option("--insecure-http", help="plain HTTP, for labs only (no TLS)")
    ] = False,
) -> None:
    """Serve signed manifests, objects and the pull agents' desired state over HTTPS."""
    from orchestrator.dmlserver import serve as run_server

    run_server(listen, insecure_http=insecure_http, progress=out.progress)
