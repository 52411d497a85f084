"""The throwaway PostgreSQL server the CMS tests (and others) use: tests/pg.py."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests import pg


def test_missing_postgresql_binaries_fail_with_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setattr(pg, "PG_BIN_GLOB", str(tmp_path / "nowhere" / "*" / "bin"))
    monkeypatch.setenv("PATH", str(tmp_path))

    with pytest.raises(pg.PostgresUnavailable, match=r"\.ci/bootstrap"):
        pg.find_bindir()


def test_the_server_listens_on_localhost_by_password(
    postgres_server: pg.PostgresServer, postgres_url: str
) -> None:
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
            assert conn.execute(sa.text("SHOW fsync")).scalar() == "off"
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == "ferry_test"
        wrong = sa.create_engine(postgres_url.replace(postgres_server.password, "wrong"))
        with pytest.raises(sa.exc.OperationalError, match="password authentication failed"):
            wrong.connect()
    finally:
        engine.dispose()
    assert postgres_server.datadir.is_dir() and pg._alive(postgres_server.pid)
