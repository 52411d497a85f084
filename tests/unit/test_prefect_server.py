"""The warm Prefect server: one per Prefect home, reused, its runs visible, stopped on demand
and after idling. Real Prefect, real processes, no mocks.

Every server these tests start is stopped by its recorded PID (the module fixture's
finalizer kills any recorded process group still alive), so nothing is left running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from prefect import flow
from typer.testing import CliRunner

from orchestrator.errors import BadInput
from orchestrator.prefect_env import configure_prefect
from orchestrator.prefect_server import (
    PrefectServerError,
    ServerInUse,
    ensure_server,
    release_server,
    server_status,
    stop_server,
)
from orchestrator.settings import reset_settings

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(180)


@flow(name="ferry-warm-server-probe", flow_run_name="probe-{token}")
def probe(token: str) -> str:
    return token


# ---- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ferry_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Ferry home shared by the module (the Prefect database is created once)."""
    ferry = tmp_path_factory.mktemp("ferry-home")
    home = ferry / "prefect"
    try:
        yield ferry
    finally:
        release_server()
        stop_server(home, force=True)
        for pid, pgid, port in _seen:
            _kill_if_ours(pid, pgid, port, home)


@pytest.fixture
def home(ferry_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The Prefect home, with this process's env pointing at it; no server left by a test."""
    from orchestrator.prefect_env import QUIET

    cleared = ["PREFECT_HOME", "PREFECT_API_URL", "PREFECT_API_SSL_CERT_FILE"]
    for key in [*os.environ, *QUIET, *cleared]:
        if key.startswith(("FERRY_", "PREFECT_")) or key in QUIET:
            monkeypatch.setenv(key, "")  # recorded, so what configure_prefect sets is undone
            monkeypatch.delenv(key)
    monkeypatch.setenv("FERRY_HOME", str(ferry_dir))
    reset_settings()
    yield (ferry_dir / "prefect").resolve()
    release_server()
    reset_settings()


_seen: list[tuple[int, int, int]] = []


def recorded(home: Path) -> dict:
    """The state file, noted for the finalizer."""
    state = json.loads((home / "server.json").read_text())
    _seen.append((state["pid"], state["pgid"], state["port"]))
    return state


def argv(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []  # gone (a zombie has an empty cmdline too)


def alive(pid: int) -> bool:
    return bool(argv(pid))


def watchdogs(home: Path) -> list[int]:
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [p for p in pids if "orchestrator.prefect_server" in argv(p) and str(home) in argv(p)]


def _kill_if_ours(pid: int, pgid: int, port: int, home: Path) -> None:
    ours = str(home) in argv(pgid) or (str(port) in argv(pid) and "prefect" in argv(pid))
    if ours:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def clean_env(ferry_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FERRY_", "PREFECT_"))}
    return {**env, "FERRY_HOME": str(ferry_dir), **extra}


def start_in_child(ferry_dir: Path) -> subprocess.Popen[str]:
    code = (
        "from orchestrator.prefect_env import prefect_home\n"
        "from orchestrator.prefect_server import ensure_server\n"
        "print(ensure_server(prefect_home(), hold=False))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(ferry_dir),
        cwd=ROOT,
    )


def api_post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


# ---- the specification ---------------------------------------------------------------------


def test_two_commands_at_once_start_one_server_and_the_next_command_reuses_it_at_once(
    home: Path, ferry_dir: Path
) -> None:
    stop_server(home, force=True)
    first, second = start_in_child(ferry_dir), start_in_child(ferry_dir)
    outputs = [p.communicate(timeout=150) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, outputs
    urls = {out.strip() for out, _err in outputs}
    assert len(urls) == 1, outputs
    state = recorded(home)
    assert watchdogs(home) == [state["pgid"]]

    began = time.monotonic()
    url = ensure_server(home, hold=False)
    assert time.monotonic() - began < 2.0
    assert url == state["url"] == urls.pop()
    assert recorded(home)["pid"] == state["pid"]
    assert watchdogs(home) == [state["pgid"]]
    status = server_status(home)
    assert status["running"] and status["pid"] == state["pid"] and status["url"] == url


def test_a_flow_run_of_a_fresh_process_goes_to_the_warm_server_and_stays_visible(
    home: Path, ferry_dir: Path
) -> None:
    url = ensure_server(home, hold=False)
    token = uuid.uuid4().hex[:12]
    code = (
        "import sys\n"
        "from orchestrator.prefect_env import configure_prefect\n"
        "print(configure_prefect())\n"  # as `ferry deploy` does: before importing prefect
        "from tests.unit.test_prefect_server import probe\n"
        "print(probe(sys.argv[1]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, token],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(ferry_dir),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mode, result = proc.stdout.strip().splitlines()[-2:]
    assert mode.startswith(f"embedded server {url} (kept warm")
    assert result == token
    runs = api_post(
        f"{url}/flow_runs/filter", {"flow_runs": {"name": {"any_": [f"probe-{token}"]}}}
    )
    assert [(r["name"], r["state_type"]) for r in runs] == [(f"probe-{token}", "COMPLETED")]
    assert recorded(home)["url"] == url  # the run started no other server


def test_ferry_prefect_stop_ends_the_server_by_its_recorded_pid_and_is_idempotent(
    home: Path,
) -> None:
    from orchestrator.cli.prefect import app

    ensure_server(home, hold=False)
    state = recorded(home)
    runner = CliRunner()

    shown = runner.invoke(app, ["status", "-o", "json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert (data["running"], data["pid"], data["url"]) == (True, state["pid"], state["url"])

    stopped = runner.invoke(app, ["stop", "-o", "json"])
    assert stopped.exit_code == 0, stopped.output
    assert json.loads(stopped.stdout) == {"stopped": True, "pid": state["pid"], "url": state["url"]}
    assert not alive(state["pid"]) and not alive(state["pgid"])
    assert not (home / "server.json").exists()

    again = runner.invoke(app, ["stop"])
    assert again.exit_code == 0 and "not running" in again.stdout
    assert "not running" in runner.invoke(app, ["status"]).stdout


def test_an_idle_server_stops_by_itself_but_not_while_a_command_uses_it(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRY_PREFECT_IDLE", "3")
    monkeypatch.setenv("FERRY_PREFECT_WATCH_INTERVAL", "1")
    stop_server(home, force=True)  # the idle limit is read when a server starts
    ensure_server(home, hold=True)  # this process now counts as a running command
    state = recorded(home)
    assert state["idle_seconds"] == 3

    time.sleep(5)  # past the idle limit, but in use
    assert alive(state["pid"])
    assert server_status(home)["in_use"]
    with pytest.raises(ServerInUse):
        stop_server(home)

    release_server()
    assert wait_until(lambda: not alive(state["pid"]), 20), "the idle server still runs"
    assert wait_until(lambda: not alive(state["pgid"]), 5), "its watchdog still runs"
    assert not (home / "server.json").exists()
    assert "idle" in (home / "server.log").read_text()


def test_a_server_that_cannot_start_is_one_clear_error_naming_its_log_and_leaves_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = tmp_path / "prefect"
    monkeypatch.setenv("PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", "soon")  # the server refuses it
    with pytest.raises(PrefectServerError, match="exited before it answered") as failed:
        ensure_server(broken, hold=False)
    assert str(broken / "server.log") in failed.value.message
    assert "keepalive_timeout" in (broken / "server.log").read_text()
    assert not (broken / "server.json").exists()
    assert wait_until(lambda: watchdogs(broken) == [], 5)


def test_ferry_prefect_ephemeral_starts_no_server_and_a_wrong_mode_is_bad_input(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stop_server(home, force=True)
    monkeypatch.setenv("FERRY_PREFECT", "ephemeral")
    assert configure_prefect() == f"embedded {home}"
    assert "PREFECT_API_URL" not in os.environ
    assert not (home / "server.json").exists()

    monkeypatch.setenv("FERRY_PREFECT", "sometimes")
    with pytest.raises(BadInput, match="FERRY_PREFECT='sometimes'"):
        configure_prefect()
