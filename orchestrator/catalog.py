"""The release catalog: releases in the CMS, and the DML behind them.

Build, check in (under an RFC), mark deployed, withdraw. It lives in the orchestrator, not in
`dml/`, because it joins three parts that the DML must not depend on: the DML itself, the
CMS records and the change gate. Status accounting follows ITIL, one audit event per change:

    registered ──checkin (RFC)──▶ checked-in ──mark_deployed──▶ deployed ──▶ withdrawn
         └──────────────────────────────────────────────────────────────────▲

`build_release` stores the package in the DML first and records it in the CMS second, so
a crash between the two is repaired by building again (the DML part is then a no-op).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dml.image import add_images
from dml.package import build_archive
from dml.provenance import build_provenance
from dml.ref import ReleaseRef
from dml.sources import collect
from dml.spec import load_spec, without_units
from dml.store import DML, WriteOnceRefused
from dml.verified import VerifiedPackage
from orchestrator.change import gate
from orchestrator.cms import audit
from orchestrator.cms.models import Package, Release
from orchestrator.errors import BadInput, IntegrityError, NotFound, SpecError

REGISTERED, CHECKED_IN, DEPLOYED, WITHDRAWN = "registered", "checked-in", "deployed", "withdrawn"
STATUSES = (REGISTERED, CHECKED_IN, DEPLOYED, WITHDRAWN)

Progress = Callable[[str], None]


def _now(now: datetime | None) -> datetime:
    return now or datetime.now(UTC)


def build_release(
    spec_path: Path | str,
    version: str | None = None,
    without: list[str] | tuple[str, ...] = (),
    dml: DML | None = None,
    *,
    session: Session | None = None,
    actor: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build the spec's package, store it in the DML (registered), record it in the CMS."""
    from orchestrator.settings import get_settings

    spec_path = Path(spec_path)
    actor = actor or get_settings().actor
    spec = load_spec(spec_path, version)
    units = without_units(spec, spec_path, list(without))
    dml = dml or DML.from_settings()
    say = progress or (lambda _msg: None)
    with collect(spec_path, units, skip=[dml.root]) as sources:
        for unit in units:
            if units[unit].image is not None:
                continue
            if not any(f.path.startswith(unit + "/") for f in sources.files):
                field = "include" if units[unit].include else "source"
                raise SpecError(
                    str(spec_path),
                    f"units.{unit}.{field}",
                    "the unit has no files",
                    "check the source and its include/exclude globs",
                )
        total = sum(f.size for f in sources.files)
        say(
            f"building {spec.name}@{spec.version}: {len(units)} units, "
            f"{len(sources.files)} files, {_size(total)}"
        )

        def report(done: int, all_: int) -> None:
            say(f"  packaged {_size(done)} of {_size(all_)}")

        built = build_archive(
            spec.name,
            spec.version,
            sorted(units),
            sources.files,
            dml.tmp_dir,
            report if total > 256 << 20 else None,
        )
        try:  # a package refused from here on leaves no temp archive behind
            built = add_images(built, spec_path, units, dml, sources.provenance, say)
            prov = build_provenance(spec_path, sources.provenance, actor)
            # the key only once the package is whole: a spec refused above makes no key
            key_created = dml.ensure_keys()
        except BaseException:
            built.archive_path.unlink(missing_ok=True)
            raise
    if key_created:
        say(f"made the DML signing key {dml.key_id()} in {dml.keys_dir} (first use)")
    stored = dml.store(built, prov)  # consumes the archive, or removes it when it fails
    pkg = dml.open(stored.release, verify_archive=False)
    if session is None:
        from orchestrator.cms.db import session_scope

        with session_scope() as s:
            rel = register(s, pkg, actor=actor)
            status = rel.status
    else:
        status = register(session, pkg, actor=actor).status
    return {
        "release": stored.release,
        "digest": stored.digest,
        "status": status,
        "new": stored.new,
        "files": len(pkg.files),
        "size": built.total_size,
        "units": pkg.units,
        "archive_digest": stored.archive_digest,
        "archive_size": stored.archive_size,
        "manifest_digest": stored.manifest_digest,
        "signature_digest": stored.signature_digest,
        "key_id": stored.key_id,
        "key_created": key_created,
        "dml": str(dml.root),
    }


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def get(session: Session, release: str) -> Release:
    ref = ReleaseRef.parse(release)
    rel = session.scalars(
        select(Release).where(Release.name == ref.name, Release.version == ref.version)
    ).one_or_none()
    if rel is None:
        raise NotFound(f"release {release} is not registered (build it: ferry release build)")
    return rel


def list_releases(session: Session, status: str | None = None) -> list[Release]:
    q = select(Release).order_by(Release.name, Release.id)
    if status:
        q = q.where(Release.status == status)
    return list(session.scalars(q))


def register(session: Session, pkg: VerifiedPackage, *, actor: str) -> Release:
    """Record a stored package as a registered release; the same package again is a no-op."""
    try:
        rel = get(session, pkg.release)
    except NotFound:
        rel = None
    if rel is not None:
        if rel.digest != pkg.digest:
            raise WriteOnceRefused(
                f"{pkg.release} is registered in the CMS as {rel.digest}, "
                f"the DML holds {pkg.digest}; give the build a new version"
            )
        return rel
    rel = Release(
        name=pkg.name, version=pkg.version, status=REGISTERED, digest=pkg.digest, created_by=actor
    )
    rel.package = Package(
        digest=pkg.digest,
        archive_digest="sha256:" + pkg.archive_sha256,
        manifest_digest=pkg.manifest_digest,
        size=pkg.archive_size,
        file_count=len(pkg.files),
        units=pkg.units,
        provenance=pkg.provenance,
        key_id=pkg.key_id,
    )
    session.add(rel)
    session.flush()
    audit.append(
        session,
        actor=actor,
        action="release.registered",
        subject_type="release",
        subject_id=pkg.release,
        data={
            "digest": pkg.digest,
            "files": len(pkg.files),
            "units": pkg.units,
            "key_id": pkg.key_id,
        },
    )
    return rel


def checkin(
    session: Session,
    release: str,
    rfc_id: int | str,
    actor: str,
    now: datetime | None = None,
    dml: DML | None = None,
) -> Release:
    """Check a registered release in (deployable), if an RFC authorizes it; idempotent."""
    rel = get(session, release)
    if rel.status in (CHECKED_IN, DEPLOYED):
        return rel
    if rel.status == WITHDRAWN:
        raise BadInput(f"{release} was withdrawn; it cannot be checked in (build a new version)")
    pkg = (dml or DML.from_settings()).open(release)  # full verification before baselining
    if pkg.digest != rel.digest:
        raise IntegrityError(f"{release}: the DML holds {pkg.digest}, the CMS {rel.digest}")
    when = _now(now)
    gate.require(session, rfc_id=rfc_id, stage="checkin", release=release, now=when, actor=actor)
    rel.status = CHECKED_IN
    rel.checked_in_at = when
    rel.checked_in_rfc = gate.parse_rfc_id(rfc_id)
    audit.append(
        session,
        actor=actor,
        action="release.checked-in",
        subject_type="release",
        subject_id=release,
        data={"digest": rel.digest, "rfc": rel.checked_in_rfc},
    )
    return rel


def mark_deployed(
    session: Session,
    release: str,
    environment: str,
    actor: str | None = None,
    now: datetime | None = None,
) -> Release:
    """Record that a checked-in release now runs in `environment` (called by deployments)."""
    rel = get(session, release)
    if rel.status not in (CHECKED_IN, DEPLOYED):
        raise BadInput(f"{release} is {rel.status}; only a checked-in release can be deployed")
    rel.status = DEPLOYED
    audit.append(
        session,
        actor=actor or _actor(),
        action="release.deployed",
        subject_type="release",
        subject_id=release,
        data={"environment": environment, "at": _now(now).isoformat()},
    )
    return rel


def withdraw(
    session: Session,
    release: str,
    actor: str | None = None,
    reason: str = "",
    now: datetime | None = None,
) -> Release:
    """Withdraw a release: it stays in the DML (write-once) but is never deployed again."""
    rel = get(session, release)
    if rel.status == WITHDRAWN:
        return rel
    previous, rel.status = rel.status, WITHDRAWN
    audit.append(
        session,
        actor=actor or _actor(),
        action="release.withdrawn",
        subject_type="release",
        subject_id=release,
        data={"from": previous, "reason": reason, "at": _now(now).isoformat()},
    )
    return rel


def referenced_digests(session: Session) -> set[str]:
    """Blob digests the CMS still names (packages of every release, whatever its status)."""
    rows = session.execute(select(Package.archive_digest, Package.manifest_digest))
    return {d for row in rows for d in row}


def _actor() -> str:
    from orchestrator.settings import get_settings

    return get_settings().actor
