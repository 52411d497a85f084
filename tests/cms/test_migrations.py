"""The CMS schema: migrations reach head on both backends, build the same schema on both,
and agree with the models (a model column without a migration fails here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import make_url

from orchestrator.cms import audit, db
from orchestrator.cms.models import AuditEvent, AuditHead, Base
from tests.cms.conftest import sqlite_url
from tests.pg import PostgresServer


def test_the_named_head_is_the_migration_scripts_head() -> None:
    # opening the CMS compares against db.HEAD_REVISION without importing alembic: a new
    # migration must name itself there
    assert db.head_revision() == db.scripts_head_revision() == db.HEAD_REVISION


def test_upgrade_migrates_an_empty_database_to_head(cms_url: str) -> None:
    before, after = db.upgrade(cms_url)

    assert before is None
    assert after == db.head_revision()
    tables = set(inspect(db.get_engine(cms_url)).get_table_names())
    assert {t.name for t in Base.metadata.sorted_tables} | {"alembic_version"} <= tables


def test_upgrade_is_a_no_op_at_head(migrated_url: str) -> None:
    assert db.upgrade(migrated_url) == (db.head_revision(), db.head_revision())


def test_ferry_cms_upgrade_migrates_the_configured_database(cms_url: str, run_ferry) -> None:
    first = run_ferry("cms", "upgrade", "--output", "json")
    again = run_ferry("cms", "upgrade")

    assert first.returncode == 0, first.stderr
    assert first.json()["from"] is None
    assert first.json()["to"] == db.head_revision()
    assert again.returncode == 0, again.stderr
    assert f"revision {db.head_revision()} → {db.head_revision()}" in again.stdout
    # the URL is shown without its password
    password = make_url(cms_url).password
    if password:
        assert password not in first.stdout + again.stdout
    assert db.current_revision(db.get_engine(cms_url, migrate=False)) == db.head_revision()


def test_a_new_database_is_migrated_on_first_use(cms_url: str) -> None:
    with db.session_scope(cms_url) as session:
        head = session.get(AuditHead, 1)
        assert head is not None and (head.last_id, head.last_hash) == (0, audit.GENESIS)
        assert session.scalars(sa.select(AuditEvent)).all() == []

    assert db.current_revision(db.get_engine(cms_url)) == db.head_revision()


def test_ferry_cms_verify_audit_on_a_new_database_migrates_it_first(
    cms_url: str, ferry_cli
) -> None:
    result = ferry_cli("cms", "verify-audit", "--output", "json")

    assert result.returncode == 0, result.stderr
    assert result.json()["ok"] is True and result.json()["events"] == 0


def test_models_and_migrations_agree(migrated_url: str) -> None:
    engine = db.get_engine(migrated_url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)

    assert diff == [], (
        "the models differ from the migrated schema; add an Alembic migration "
        f"(orchestrator/cms/migrations/versions/): {diff}"
    )


def test_model_migration_check_notices_a_column_without_a_migration(
    migrated_url: str,
) -> None:
    metadata = sa.MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(metadata)
    metadata.tables["hosts"].append_column(sa.Column("rack", sa.String(50), nullable=True))

    with db.get_engine(migrated_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)

    assert [d[0] for d in diff] == ["add_column"]
    assert diff[0][2:4] == ("hosts", metadata.tables["hosts"].c.rack)


# -- the same migration creates the same schema on SQLite and PostgreSQL --------------------


def _type_family(column_type: sa.types.TypeEngine) -> str:
    # most specific first: Text is a String, DateTime is not an Integer, …
    families = [
        (sa.Boolean, "boolean"),
        (sa.Text, "text"),
        (sa.String, "string"),
        (sa.BigInteger, "integer"),
        (sa.Integer, "integer"),
        (sa.DateTime, "datetime"),
        (sa.JSON, "json"),
        (sa.Numeric, "numeric"),
        (sa.LargeBinary, "binary"),
    ]
    for cls, name in families:
        if isinstance(column_type, cls):
            length = getattr(column_type, "length", None)
            return f"{name}({length})" if name == "string" and length else name
    return type(column_type).__name__.lower()


def schema_of(url: str) -> dict[str, Any]:
    """A backend-neutral picture of a database's schema, as SQLAlchemy's inspector sees it."""
    engine = db.get_engine(url, migrate=False)
    insp = inspect(engine)
    schema: dict[str, Any] = {}
    for table in sorted(insp.get_table_names()):
        schema[table] = {
            "columns": {
                c["name"]: (_type_family(c["type"]), c["nullable"]) for c in insp.get_columns(table)
            },
            "primary_key": tuple(insp.get_pk_constraint(table)["constrained_columns"]),
            "unique": sorted(tuple(u["column_names"]) for u in insp.get_unique_constraints(table)),
            "foreign_keys": sorted(
                (
                    tuple(fk["constrained_columns"]),
                    fk["referred_table"],
                    tuple(fk["referred_columns"]),
                )
                for fk in insp.get_foreign_keys(table)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in insp.get_indexes(table)
                # PostgreSQL also lists the index behind each unique constraint
                if not i.get("duplicates_constraint")
            ),
        }
    return schema


def test_the_migration_builds_the_same_schema_on_sqlite_and_postgresql(
    ferry_home: Path, postgres_server: PostgresServer
) -> None:
    lite = sqlite_url(ferry_home)
    pg = postgres_server.create_database()
    try:
        db.upgrade(lite)
        db.upgrade(pg)

        on_sqlite, on_postgres = schema_of(lite), schema_of(pg)
    finally:
        db.dispose_all()
        postgres_server.drop_database(make_url(pg).database)

    assert set(on_sqlite) == set(on_postgres)
    for table in on_sqlite:
        assert on_sqlite[table] == on_postgres[table], table
    # and the picture is not vacuous
    assert on_sqlite["audit_events"]["columns"]["data"] == ("json", False)
    assert on_sqlite["rfcs"]["columns"]["needs_review"] == ("boolean", False)
    assert on_sqlite["releases"]["unique"] == [("name", "version")]
    assert (("rfc_id",), "rfcs", ("id",)) in on_sqlite["approvals"]["foreign_keys"]
