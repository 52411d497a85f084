"""CMS records (SQLAlchemy 2 typed models).

The schema is created by Alembic migrations in `migrations/versions/`; a test checks that
the models and the migrations agree, on SQLite and PostgreSQL. Times are stored as UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Naive UTC in the database, aware UTC in Python, on every backend."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the CMS; use an aware UTC time")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Environment(Base):
    __tablename__ = "environments"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    criticality: Mapped[str] = mapped_column(String(20), default="medium")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Host(Base):
    """A configuration item: one target host as the inventory names it."""

    __tablename__ = "hosts"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    address: Mapped[str] = mapped_column(String(200))
    environment: Mapped[str | None] = mapped_column(String(100))
    groups: Mapped[list[Any]] = mapped_column(default=list)
    deploy_root: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class Release(Base):
    """name@version; its status follows ITIL: registered → checked-in → deployed → withdrawn."""

    __tablename__ = "releases"
    __table_args__ = (UniqueConstraint("name", "version"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    version: Mapped[str] = mapped_column(String(100))
    status: Mapped[str] = mapped_column(String(20), default="registered")
    digest: Mapped[str] = mapped_column(String(80))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    checked_in_at: Mapped[datetime | None] = mapped_column(default=None)
    checked_in_rfc: Mapped[int | None] = mapped_column(default=None)
    package: Mapped[Package | None] = relationship(back_populates="release", uselist=False)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class Package(Base):
    """The release package in the DML: content digest, archive blob, manifest, signature."""

    __tablename__ = "packages"
    id: Mapped[int] = mapped_column(primary_key=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("releases.id"), unique=True)
    digest: Mapped[str] = mapped_column(String(80), unique=True)
    archive_digest: Mapped[str] = mapped_column(String(80))
    manifest_digest: Mapped[str] = mapped_column(String(80))
    size: Mapped[int] = mapped_column(BigInteger)
    file_count: Mapped[int] = mapped_column(Integer)
    units: Mapped[list[Any]] = mapped_column(default=list)
    provenance: Mapped[dict[str, Any]] = mapped_column(default=dict)
    key_id: Mapped[str] = mapped_column(String(80))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    release: Mapped[Release] = relationship(back_populates="package")


class RFC(Base):
    """A request for change, of a change model, with its lifecycle status."""

    __tablename__ = "rfcs"
    id: Mapped[int] = mapped_column(primary_key=True)
    title: Mapped[str] = mapped_column(String(300), default="")
    release: Mapped[str] = mapped_column(String(300))
    environment: Mapped[str] = mapped_column(String(100))
    model: Mapped[str] = mapped_column(String(40))
    template: Mapped[str | None] = mapped_column(String(100), default=None)
    status: Mapped[str] = mapped_column(String(30), default="draft")
    stages: Mapped[list[Any]] = mapped_column(default=list)
    hosts: Mapped[list[Any]] = mapped_column(default=list)
    risk: Mapped[str] = mapped_column(String(20), default="low")
    risk_score: Mapped[int] = mapped_column(Integer, default=0)
    risk_reason: Mapped[str | None] = mapped_column(Text, default=None)
    backout_plan: Mapped[str] = mapped_column(Text, default="")
    requester: Mapped[str] = mapped_column(String(200))
    needs_review: Mapped[bool] = mapped_column(default=False)
    review_due: Mapped[datetime | None] = mapped_column(default=None)
    # change authorization (orchestrator/change): lead time runs from submission; the risk
    # model's factors are kept so an override never hides why the score was what it was
    submitted_at: Mapped[datetime | None] = mapped_column(default=None)
    authorized_at: Mapped[datetime | None] = mapped_column(default=None)
    risk_factors: Mapped[list[Any]] = mapped_column(default=list)
    # the CI job that raised it (orchestrator/ci.py): pipeline, job, commit, actor
    ci: Mapped[dict[str, Any] | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    approvals: Mapped[list[Approval]] = relationship(
        back_populates="rfc", order_by="Approval.id", cascade="all, delete-orphan"
    )
    windows: Mapped[list[ChangeWindow]] = relationship(
        back_populates="rfc", order_by="ChangeWindow.id", cascade="all, delete-orphan"
    )


class Approval(Base):
    __tablename__ = "approvals"
    id: Mapped[int] = mapped_column(primary_key=True)
    rfc_id: Mapped[int] = mapped_column(ForeignKey("rfcs.id"))
    approver: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(50))
    decision: Mapped[str] = mapped_column(String(20))
    stage: Mapped[str | None] = mapped_column(String(30), default=None)
    comment: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    rfc: Mapped[RFC] = relationship(back_populates="approvals")


class ChangeWindow(Base):
    """A window an RFC is scheduled in (UTC start/end)."""

    __tablename__ = "change_windows"
    id: Mapped[int] = mapped_column(primary_key=True)
    rfc_id: Mapped[int] = mapped_column(ForeignKey("rfcs.id"))
    start: Mapped[datetime]
    end: Mapped[datetime]
    rfc: Mapped[RFC] = relationship(back_populates="windows")


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(primary_key=True)
    rfc_id: Mapped[int | None] = mapped_column(ForeignKey("rfcs.id"), default=None)
    release: Mapped[str] = mapped_column(String(300))
    package_digest: Mapped[str] = mapped_column(String(80))
    environment: Mapped[str] = mapped_column(String(100))
    plan_file: Mapped[str] = mapped_column(String(500))
    strategy: Mapped[str] = mapped_column(String(20))
    method: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(30), default="planned")
    rollout: Mapped[dict[str, Any]] = mapped_column(default=dict)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)
    actor: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    waves: Mapped[list[Wave]] = relationship(
        back_populates="deployment", order_by="Wave.index", cascade="all, delete-orphan"
    )


class Wave(Base):
    __tablename__ = "waves"
    __table_args__ = (UniqueConstraint("deployment_id", "index"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"))
    index: Mapped[int] = mapped_column(Integer)
    hosts: Mapped[list[Any]] = mapped_column(default=list)
    status: Mapped[str] = mapped_column(String(30), default="pending")
    verdict: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    deployment: Mapped[Deployment] = relationship(back_populates="waves")


class HostStep(Base):
    """The journal: one row per step on one host, written before the step and after it."""

    __tablename__ = "host_steps"
    id: Mapped[int] = mapped_column(primary_key=True)
    deployment_id: Mapped[int] = mapped_column(ForeignKey("deployments.id"), index=True)
    wave_index: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(200))
    step: Mapped[str] = mapped_column(String(40))
    status: Mapped[str] = mapped_column(String(20), default="started")
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class HostBaseline(Base):
    """What each host is known to run: its own baseline, as last verified."""

    __tablename__ = "host_baselines"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    environment: Mapped[str] = mapped_column(String(100))
    release: Mapped[str] = mapped_column(String(300))
    package_digest: Mapped[str] = mapped_column(String(80))
    deployment_id: Mapped[int | None] = mapped_column(default=None)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class EnvironmentBaseline(Base):
    __tablename__ = "environment_baselines"
    environment: Mapped[str] = mapped_column(String(100), primary_key=True)
    release: Mapped[str] = mapped_column(String(300))
    package_digest: Mapped[str] = mapped_column(String(80))
    deployment_id: Mapped[int | None] = mapped_column(default=None)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only, hash-chained: `hash = sha256(prev_hash + canonical(event))`."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(100))
    subject_type: Mapped[str] = mapped_column(String(50))
    subject_id: Mapped[str] = mapped_column(String(300), index=True)
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """One row: the newest event's id and hash, so that deleting the last event shows too."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(primary_key=True)
    last_id: Mapped[int] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))


class ReleaseEvidence(Base):
    """Service validation evidence on a release package, per environment (issue 18): an
    acceptance test's result, a pilot wave's verdict or a user-acceptance sign-off. Keyed by
    the package digest: a rebuilt package has none of its predecessor's evidence."""

    __tablename__ = "release_evidence"
    id: Mapped[int] = mapped_column(primary_key=True)
    release: Mapped[str] = mapped_column(String(300))
    digest: Mapped[str] = mapped_column(String(80), index=True)
    environment: Mapped[str] = mapped_column(String(100))
    deployment_id: Mapped[int | None] = mapped_column(default=None)
    kind: Mapped[str] = mapped_column(String(20))  # acceptance | pilot | sign-off
    scope: Mapped[str] = mapped_column(String(20), default="deployment")  # or pilot
    name: Mapped[str] = mapped_column(String(200))
    type: Mapped[str | None] = mapped_column(String(40), default=None)
    host: Mapped[str | None] = mapped_column(String(200), default=None)
    passed: Mapped[bool] = mapped_column(default=False)
    output: Mapped[str] = mapped_column(Text, default="")
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    actor: Mapped[str] = mapped_column(String(200))
    comment: Mapped[str] = mapped_column(Text, default="")
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class HostLock(Base):
    """One deployment, backout or recover at a time per host: a leased lock
    (orchestrator/cms/locks.py). A row is held while `expires_at` is ahead and its process
    lives; the holder renews the lease while it runs and deletes the row when it ends."""

    __tablename__ = "host_locks"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    token: Mapped[str] = mapped_column(String(64))
    purpose: Mapped[str] = mapped_column(String(20))
    deployment_id: Mapped[int | None] = mapped_column(default=None)
    release: Mapped[str] = mapped_column(String(300), default="")
    actor: Mapped[str] = mapped_column(String(200))
    machine: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    pid_start: Mapped[str] = mapped_column(String(40), default="")
    acquired_at: Mapped[datetime]
    expires_at: Mapped[datetime]


class PullAgent(Base):
    """A host's pull agent (issue 12): its token, stored hashed (scrypt, never the token),
    revocable, and its last heartbeat, which is kept apart from outcome reports so a silent
    agent and a failed deployment are told apart."""

    __tablename__ = "pull_agents"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    token_salt: Mapped[str] = mapped_column(String(64))
    token_hash: Mapped[str] = mapped_column(String(128))
    issued_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    heartbeat: Mapped[dict[str, Any]] = mapped_column(default=dict)
    nudge: Mapped[int] = mapped_column(Integer, default=0)


class PullDesired(Base):
    """The release a host should run (pull method): set by a deployment's wave or backout,
    long-polled by the host's agent through `ferry dml serve`. `generation` grows with every
    change, so an agent asks "anything after N?"."""

    __tablename__ = "pull_desired"
    host: Mapped[str] = mapped_column(String(200), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, index=True)
    environment: Mapped[str] = mapped_column(String(100))
    deployment_id: Mapped[int | None] = mapped_column(default=None)
    purpose: Mapped[str] = mapped_column(String(20))  # deploy | backout
    release: Mapped[str | None] = mapped_column(String(300), default=None)
    digest: Mapped[str | None] = mapped_column(String(80), default=None)
    release_id: Mapped[str | None] = mapped_column(String(300), default=None)
    apply: Mapped[str] = mapped_column(String(20), default="now")
    spec: Mapped[dict[str, Any]] = mapped_column(default=dict)  # rendered hooks and checks
    set_at: Mapped[datetime] = mapped_column(default=utcnow)


class PullReport(Base):
    """One step or check result an agent reported for one desired generation."""

    __tablename__ = "pull_reports"
    id: Mapped[int] = mapped_column(primary_key=True)
    host: Mapped[str] = mapped_column(String(200), index=True)
    generation: Mapped[int] = mapped_column(Integer)
    deployment_id: Mapped[int | None] = mapped_column(default=None, index=True)
    release_id: Mapped[str | None] = mapped_column(String(300), default=None)
    step: Mapped[str] = mapped_column(String(40))
    ok: Mapped[bool] = mapped_column(default=False)
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)
    at: Mapped[datetime] = mapped_column(default=utcnow)
