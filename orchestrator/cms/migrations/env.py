"""Alembic environment for the CMS; run through `orchestrator.cms.db.upgrade`."""

from alembic import context
from sqlalchemy import text

from orchestrator.cms.db import make_engine
from orchestrator.cms.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url"))
        with engine.begin() as connection:
            _run(connection)
    else:
        _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    if connection.dialect.name == "postgresql":
        # two processes migrating a new database at once: the second waits, then sees head
        connection.execute(text("SELECT pg_advisory_xact_lock(7316001)"))
    context.configure(connection=connection, target_metadata=target_metadata)
    context.run_migrations()


run_migrations_online()
