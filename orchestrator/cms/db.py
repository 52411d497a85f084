"""Opening the CMS: engines, sessions and migrations.

SQLite (the embedded default) runs in WAL mode with a busy timeout, and every transaction
starts with BEGIN IMMEDIATE, so concurrent writers queue instead of failing on a lock
upgrade. A new database is migrated to the newest revision on first use; `ferry cms upgrade`
does the same explicitly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from orchestrator.errors import BadInput

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS = Path(__file__).parent / "migrations"
# The newest migration's revision. Every command opens the CMS, and importing alembic to
# learn the head costs ~0.15-0.3 s of start-up; so the head is named here, alembic is
# imported only to migrate, and tests/cms/test_migrations.py checks that this constant is
# what the migration scripts say.
HEAD_REVISION = "issue12_pull_agents"

_engines: dict[str, Engine] = {}
_factories: dict[Engine, sessionmaker[Session]] = {}
_migrated: set[str] = set()
_lock = threading.Lock()


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _say_if_a_parent_has_one(Path(parsed.database))
            try:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise BadInput(
                    f"the CMS at {url} cannot be made: {exc.strerror}: {exc.filename} (check "
                    "database_url in ferry.toml, FERRY_DATABASE_URL or FERRY_HOME)"
                ) from None
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record) -> None:  # type: ignore[no-untyped-def]
            dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn) -> None:  # type: ignore[no-untyped-def]
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() in ("", "psycopg2"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, pool_pre_ping=True)


def _say_if_a_parent_has_one(database: Path) -> None:
    """A new CMS under a directory whose parent already has one is most likely a command
    run in the wrong place: say so (stderr), naming both."""
    if database.exists():
        return
    from orchestrator.home import cms_above

    above = cms_above(database.parent)
    if above is not None:
        import sys

        print(
            f"warning: making a new CMS at {database}, but {above} already exists in a parent "
            "directory (run from there, or set FERRY_HOME to use it)",
            file=sys.stderr,
        )


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def current_revision(engine: Engine) -> str | None:
    """The CMS's revision, read as alembic keeps it (one row of `alembic_version`); None
    for a database that was never migrated."""
    from sqlalchemy import inspect

    with engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return None
        rows = conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all()
    return rows[0] if len(rows) == 1 else None


def head_revision() -> str | None:
    return HEAD_REVISION


def scripts_head_revision() -> str | None:
    """The head as the migration scripts say (alembic's ScriptDirectory)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def upgrade(url: str) -> tuple[str | None, str | None]:
    """Apply migrations up to head; return (before, after) revisions."""
    engine = get_engine(url, migrate=False)
    before = current_revision(engine)
    from alembic import command

    cfg = alembic_config(url)
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    _migrated.add(url)
    return before, current_revision(engine)


def get_engine(url: str, *, migrate: bool = True) -> Engine:
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
    if migrate and url not in _migrated:
        try:
            revision = current_revision(engine)  # the first connection of this process
        except OperationalError as exc:
            raise _unreachable(url, exc) from None
        if revision != head_revision():
            upgrade(url)
        _migrated.add(url)
    return engine


def _unreachable(url: str, exc: OperationalError) -> BadInput:
    """The CMS cannot be opened at all (a host that does not resolve, a server down, a
    password refused, a file that cannot be made): a line naming it, not a traceback."""
    # no password, and no query either (`?password=…` is one too)
    shown = make_url(url).set(query={}).render_as_string(hide_password=True)
    why = " ".join(str(exc.orig or exc).split())[:300]
    return BadInput(
        f"the CMS at {shown} cannot be opened: {why} (check database_url in ferry.toml or "
        "FERRY_DATABASE_URL, and that the database is up)"
    )


def dispose_all() -> None:
    for engine in _engines.values():
        engine.dispose()
    _engines.clear()
    _factories.clear()
    _migrated.clear()


@contextmanager
def session_scope(url: str | None = None) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any error."""
    if url is None:
        from orchestrator.settings import get_settings

        url = get_settings().cms_url
    engine = get_engine(url)
    factory = _factories.get(engine)
    if factory is None:  # one per engine: making a sessionmaker costs more than a commit
        factory = _factories[engine] = sessionmaker(engine, expire_on_commit=False)
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
