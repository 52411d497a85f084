"""CMS test fixtures: every CMS test runs on SQLite and on a real PostgreSQL server.

`cms_url` is parametrised over both backends; it points FERRY_DATABASE_URL at a new, empty
database (a file in the test's Ferry home, or a fresh PostgreSQL database), so both the
in-process API and the `ferry` CLI (run_ferry) use it. Nothing is migrated yet: tests that
want a ready CMS use `migrated_url`.

`ferry_cli` runs the CLI's entry point in this process: the same code as the `ferry` command
(run_ferry) without its second of start-up, for the many checks of output. The acceptance
checks (upgrade, tampering) still run the real command in a child process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.cms import db
from orchestrator.settings import reset_settings
from tests.conftest import Result
from tests.pg import fresh_postgres_url, postgres_server, postgres_url  # noqa: F401

BACKENDS = ["sqlite", "postgresql"]


def sqlite_url(home: Path) -> str:
    return f"sqlite:///{home / '.ferry' / 'cms.db'}"


@pytest.fixture(params=BACKENDS)
def cms_url(
    request: pytest.FixtureRequest, ferry_home: Path, monkeypatch: pytest.MonkeyPatch
) -> str:
    """URL of an empty CMS database on each backend; FERRY_DATABASE_URL is set to it."""
    if request.param == "sqlite":
        url = sqlite_url(ferry_home)
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    monkeypatch.setenv("FERRY_DATABASE_URL", url)
    reset_settings()
    return url


@pytest.fixture
def migrated_url(cms_url: str) -> str:
    """`cms_url`, migrated to the newest revision."""
    db.upgrade(cms_url)
    return cms_url


@pytest.fixture
def ferry_cli(ferry_home: Path, capsys: pytest.CaptureFixture[str]):
    """`ferry ARGS…` through `orchestrator.cli.main.main`, in-process; returns its Result."""
    from orchestrator.cli.main import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        reset_settings()
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
