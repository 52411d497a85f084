"""`ferry cms`: migrations and the audit log's integrity."""

from __future__ import annotations

import re
from typing import Annotated

import typer

from orchestrator.cli import output as out
from orchestrator.cli.output import OutputOpt
from orchestrator.errors import BadInput, FerryError, IntegrityError

app = typer.Typer(help="The CMS: apply migrations, verify the audit log.", no_args_is_help=True)


@app.command()
def upgrade(fmt: OutputOpt = out.Format.text) -> None:
    """Apply the CMS migrations up to the newest revision (a new database is created)."""
    out.use(fmt)
    from orchestrator.cms import db
    from orchestrator.settings import get_settings

    url = get_settings().cms_url
    before, after = db.upgrade(url)
    out.result(
        {"database": _safe_url(url), "from": before, "to": after},
        f"CMS at {_safe_url(url)}: revision {before or '(empty)'} → {after}",
    )


AnchorOpt = Annotated[
    str | None,
    typer.Option(
        "--anchor",
        metavar="ID:HASH",
        help="a head exported earlier (this command prints it): event ID must still have "
        "HASH, which catches a log rewritten together with its head",
    ),
]


@app.command("verify-audit")
def verify_audit(anchor: AnchorOpt = None, fmt: OutputOpt = out.Format.text) -> None:
    """Re-hash the audit log's chain and cross-check every RFC status and approval against
    its audit event; exit 6 naming the first broken event, or every row without its event."""
    out.use(fmt)
    from orchestrator.change.binding import unbound_rows
    from orchestrator.cms import audit, db

    expected = _parse_anchor(anchor) if anchor else None
    with db.session_scope() as session:
        report = audit.verify_chain(session, anchor=expected)
        unbound = unbound_rows(session) if report.ok else []
    if not report.ok:
        raise IntegrityError(
            f"audit log broken at event {report.first_broken}: {report.problem}",
            details=report.to_dict(),
        )
    if unbound:
        raise IntegrityError(
            f"audit log intact ({report.events} events), but {len(unbound)} CMS row(s) have no "
            "matching audit event (forged or edited outside Ferry): " + "; ".join(unbound),
            details={**report.to_dict(), "ok": False, "unbound": unbound},
        )
    out.result(
        {**report.to_dict(), "unbound": []},
        f"audit log intact: {report.events} events verified, every RFC status and approval "
        f"matches its event; head {report.head_id}:{report.head_hash} (keep it elsewhere to "
        "anchor the log)",
    )


def _parse_anchor(text: str) -> tuple[int, str]:
    match = re.fullmatch(r"(\d+):([0-9a-f]{64})", text.strip())
    if match is None:
        raise BadInput(f"--anchor {text!r}: expected ID:HASH, e.g. 42:<64 hex digits>")
    return int(match[1]), match[2]


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception as exc:  # noqa: BLE001
        raise FerryError(f"FERRY_DATABASE_URL is not a database URL: {exc}") from exc
