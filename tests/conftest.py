"""Fixtures every test area shares: an isolated Ferry home, and the real `ferry` CLI.

Area fixtures live beside their tests (tests/cms/conftest.py: PostgreSQL; tests/fleet/:
the SSH fleet; …).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from orchestrator.cms import db
from orchestrator.settings import reset_settings

FERRY_BIN = Path(sys.executable).with_name("ferry")

# No test's `ferry` starts a warm process unless it asks to (FERRY_WARM=1 and a directory
# of its own); any that does anyway is ended at the session's end, by the PID it recorded.
os.environ["FERRY_WARM"] = "0"
os.environ["FERRY_WARM_DIR"] = tempfile.mkdtemp(prefix="ferry-warm-tests-")


@pytest.fixture(scope="session", autouse=True)
def _no_warm_process_left() -> Any:
    yield
    from orchestrator import zygote

    zygote.stop_all()


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def ferry_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working directory with its own .ferry/ (CMS, DML, logs); cwd is set to it."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for key in list(os.environ):
        if key.startswith("FERRY_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("FERRY_HOME", str(work / ".ferry"))
    # a test's `ferry deploy` without a Prefect server fixture gets a per-command server,
    # not a warm one left running in its temporary home (tests of the warm server opt in)
    monkeypatch.setenv("FERRY_PREFECT", "ephemeral")
    # every command runs cold in its own process (a test kills `ferry deploy` by PID and
    # means that process); tests/deploy/test_warm.py opts in to the warm start
    monkeypatch.setenv("FERRY_WARM", "0")
    monkeypatch.setenv("FERRY_USER", "alice")
    reset_settings()
    db.dispose_all()
    yield work
    reset_settings()
    db.dispose_all()


@pytest.fixture
def run_ferry(ferry_home: Path):
    """Run the real `ferry` command in a child process, in the test's Ferry home."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> Result:
        full_env = {**os.environ, **(env or {})}
        proc = subprocess.run(
            [str(FERRY_BIN), *args],
            capture_output=True,
            text=True,
            env=full_env,
            cwd=os.getcwd(),
            timeout=timeout,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    return run
