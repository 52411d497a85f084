"""The warm Prefect server: one per Prefect home, started on first use, reused, stopped idle.

On the embedded default `ferry deploy` used to start Prefect's ephemeral server afresh for
every command (9–12 s here; ../shared/notes/prefect.md). Instead `ensure_server()` keeps one
`prefect server start` running on 127.0.0.1 with the Ferry home's Prefect home (its SQLite
database, so every run stays visible in the UI at the printed URL), and later commands talk
to it over PREFECT_API_URL: a flow run then costs what it costs against a standing server.

Processes. `ensure_server()` launches a watchdog, `python -m orchestrator.prefect_server
--watch <prefect home> …`, in a session of its own; the watchdog starts the Prefect server
as its child (same session and process group, so one `killpg` of the recorded group ends
both), reports the server's PID on a pipe, and then only waits. Why a watchdog and not a
Ferry daemon: nothing of Ferry runs between commands but this small stdlib-only process,
which lives exactly as long as the server it watches, reaps it, and is the one thing that
can notice idleness when no `ferry` command runs.

Files, all in the Prefect home (`.ferry/prefect/` by default):

    server.json    pid, pgid (the watchdog's), port, url, started_at, last_used, idle limit
    server.log     the server's and the watchdog's output: read it when a start fails
    server.lock    flock: one process at a time starts, reuses, stops or ages the server
    server.in-use  flock: every command using the server holds a shared lock until it exits

Idle stop. Every use stamps `last_used`. Every FERRY_PREFECT_WATCH_INTERVAL seconds
(default 30) the watchdog takes server.lock and looks: if any command holds server.in-use
(a long deployment, a run paused for a human) the server is in use and `last_used` becomes
now; otherwise, once idle longer than FERRY_PREFECT_IDLE seconds (default 900, read when the
server starts), it stops the server under the lock, so no command can pick a dying server.

Trust. A recorded PID is acted on only when /proc/<pid>/cmdline is still that process
(`prefect server start … --port <port>`, or the watchdog); a stale state file means
start anew. Nothing is ever found or killed by name alone.

The way out: FERRY_PREFECT=ephemeral (`orchestrator.prefect_env`) gives every command its
own ephemeral server again and leaves nothing running: for CI jobs.

Errors: `PrefectServerError` (exit 1) when the server does not start or answer, naming the
log; `ServerInUse` (exit 2, nothing changed) when `stop` would cut off a running command.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import http.client
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from orchestrator.errors import BadInput, FerryError
from orchestrator.prefect_env import QUIET

HOST = "127.0.0.1"
START_TIMEOUT = 90.0  # a fresh database takes ~16–19 s here; a loaded machine much longer
STOP_GRACE = 20.0
DEFAULT_IDLE = 900.0
DEFAULT_WATCH_INTERVAL = 30.0

STATE, LOG, LOCK, IN_USE = "server.json", "server.log", "server.lock", "server.in-use"


class PrefectServerError(FerryError):
    """The warm Prefect server did not start or does not answer (its log says why)."""


class ServerInUse(BadInput):
    """A running `ferry` command uses the server; stopping it would fail that command."""


@dataclass(frozen=True)
class ServerState:
    pid: int  # `prefect server start`
    pgid: int  # its process group, led by the watchdog
    port: int
    url: str  # the API URL: PREFECT_API_URL for clients
    started_at: float
    last_used: float
    idle_seconds: float
    log: str

    @property
    def ui(self) -> str:
        return self.url.removesuffix("/api")

    def to_file(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("started_at", "last_used"):
            d[key] = datetime.fromtimestamp(d[key], UTC).isoformat(timespec="seconds")
        return d

    @classmethod
    def from_file(cls, d: dict[str, Any]) -> ServerState:
        for key in ("started_at", "last_used"):
            d[key] = datetime.fromisoformat(d[key]).timestamp()
        return cls(**d)


# ---- use -----------------------------------------------------------------------------------


def ensure_server(
    prefect_home: Path, *, hold: bool = True, progress: Callable[[str], None] | None = None
) -> str:
    """The API URL of this Prefect home's warm server, started now if none answers.

    With `hold` this process counts as using the server until it exits (or calls
    `release_server()`), so the idle stop never cuts off a running deployment.
    """
    prefect_home.mkdir(parents=True, exist_ok=True)
    with _locked(prefect_home):
        state = _read(prefect_home)
        if state is not None and not _answers(state, prefect_home):
            _terminate(state)
            _forget(prefect_home)
            state = None
        if state is None:
            if progress:
                progress(
                    "starting Prefect's server (first use; later commands reuse it, "
                    "`ferry prefect stop` ends it) …"
                )
            state = _start(prefect_home)
        else:
            state = replace(state, last_used=time.time())
            _write(prefect_home, state)
        if hold:
            _hold(prefect_home)
        return state.url


def release_server() -> None:
    """This process no longer uses a warm server (`ensure_server(hold=True)` took it)."""
    for fd in _held.values():
        os.close(fd)
    _held.clear()


def server_status(prefect_home: Path) -> dict[str, Any]:
    """What runs now, for `ferry prefect status` (reads only; counts as no use)."""
    state = _read(prefect_home)
    base: dict[str, Any] = {
        "running": False,
        "prefect_home": str(prefect_home),
        "log": str(prefect_home / LOG),
    }
    if state is None:
        return base
    if not _is_server(state.pid, state.port):
        return {**base, "stale_state": str(prefect_home / STATE)}
    if not _healthy(state.port, timeout=2):
        return {**base, "starting": True, "pid": state.pid, "url": state.url}
    in_use = _in_use(prefect_home)
    now = time.time()
    return {
        **base,
        "running": True,
        "url": state.url,
        "ui": state.ui,
        "pid": state.pid,
        "watchdog_pid": state.pgid if _is_watchdog(state.pgid, state.port) else None,
        "started_at": state.to_file()["started_at"],
        "in_use": in_use,
        "idle_for_seconds": 0 if in_use else round(now - state.last_used),
        "stops_after_idle_seconds": state.idle_seconds,
    }


def stop_server(prefect_home: Path, *, force: bool = False) -> dict[str, Any]:
    """Stop the warm server by its recorded PID (SIGTERM to its group, then SIGKILL).

    Idempotent: no server is `{"stopped": False}`. Refuses (`ServerInUse`) while a command
    uses it, unless `force`.
    """
    if not prefect_home.is_dir():
        return {"stopped": False, "reason": "not running"}
    with _locked(prefect_home):  # waits for a start in progress, then stops that server
        state = _read(prefect_home)
        if state is None:
            return {"stopped": False, "reason": "not running"}
        alive = _is_server(state.pid, state.port) or _is_watchdog(state.pgid, state.port)
        if alive and not force and _in_use(prefect_home):
            raise ServerInUse(
                f"the Prefect server (pid {state.pid}) is in use by a running ferry command; "
                "let it finish, or `ferry prefect stop --force` (that command's flow fails)",
                details={"pid": state.pid, "url": state.url},
            )
        _terminate(state)
        _forget(prefect_home)
    _wait_gone(lambda: _is_watchdog(state.pgid, state.port), 5.0)
    if not alive:
        return {"stopped": False, "reason": "not running (stale state file removed)"}
    return {"stopped": True, "pid": state.pid, "url": state.url}


# ---- start ---------------------------------------------------------------------------------


def _start(prefect_home: Path) -> ServerState:
    """Launch the watchdog (which starts the server), record it, wait until it answers."""
    idle = _env_seconds("FERRY_PREFECT_IDLE", DEFAULT_IDLE)
    interval = _env_seconds("FERRY_PREFECT_WATCH_INTERVAL", DEFAULT_WATCH_INTERVAL)
    log_path = prefect_home / LOG
    for attempt in (1, 2):  # a free port can be taken between choosing and binding it
        port = _free_port()
        env = _server_env(prefect_home, port)
        with open(log_path, "ab") as log:
            log.write(f"\n== {_now_iso()} ferry starts the Prefect server on {port}\n".encode())
            log.flush()
            watchdog = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.prefect_server", "--watch",
                 str(prefect_home), "--port", str(port), "--interval", str(interval)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, env=env,
                cwd=prefect_home, start_new_session=True,
            )  # fmt: skip
        _children.append(watchdog)  # reaped when it ends (a zombie of ours is not "alive")
        pid = _read_pid(watchdog, log_path)
        now = time.time()
        state = ServerState(
            pid=pid,
            pgid=watchdog.pid,
            port=port,
            url=f"http://{HOST}:{port}/api",
            started_at=now,
            last_used=now,
            idle_seconds=idle,
            log=str(log_path),
        )
        _write(prefect_home, state)  # first, so `ferry prefect stop` can find a slow start
        # our own child's child: trust its PID while the watchdog lives (a process that
        # has just exec'd can show an empty /proc/<pid>/cmdline for a moment)
        running = lambda w=watchdog: w.poll() is None  # noqa: E731
        if _wait_healthy(state, time.monotonic() + START_TIMEOUT, running):
            return state
        exited = not running()
        _terminate(state)
        _forget(prefect_home)
        if attempt == 1 and "address already in use" in _tail(log_path).lower():
            continue
        what = "exited before it answered" if exited else f"did not answer in {START_TIMEOUT:.0f} s"
        raise PrefectServerError(
            f"Prefect's server on {state.url} {what}; see {log_path} "
            "(or set FERRY_PREFECT=ephemeral to run without it)",
            details={"log": str(log_path), "url": state.url},
        )
    raise AssertionError("unreachable")


def _server_env(prefect_home: Path, port: int) -> dict[str, str]:
    env = {**QUIET, **os.environ, "PREFECT_HOME": str(prefect_home)}
    env.pop("PREFECT_API_URL", None)  # the server is the API; it must not call another
    # host and port as settings, not only flags: the UI reads them to find its API
    env.update(PREFECT_SERVER_API_HOST=HOST, PREFECT_SERVER_API_PORT=str(port))
    return env


def _read_pid(watchdog: subprocess.Popen[bytes], log_path: Path) -> int:
    assert watchdog.stdout is not None
    ready, _, _ = select.select([watchdog.stdout], [], [], 30)
    line = watchdog.stdout.readline() if ready else b""
    watchdog.stdout.close()
    if not line.strip().isdigit():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(watchdog.pid, signal.SIGKILL)
        raise PrefectServerError(
            f"Ferry's Prefect watchdog did not start; see {log_path}",
            details={"log": str(log_path)},
        )
    return int(line)


def _wait_healthy(state: ServerState, deadline: float, running: Callable[[], bool]) -> bool:
    while time.monotonic() < deadline:
        if not running():
            _note(state, f"the server (pid {state.pid}) exited before answering")
            return False  # the log above says why
        if _healthy(state.port, timeout=2):
            return True
        time.sleep(0.25)
    _note(state, f"no answer from {state.url}/health")
    return False


def _note(state: ServerState, message: str) -> None:
    with contextlib.suppress(OSError), open(state.log, "a") as log:
        log.write(f"== {_now_iso()} ferry: {message}\n")


def _answers(state: ServerState, prefect_home: Path) -> bool:
    """Is the recorded server ours, alive and answering? (A start in progress gets time.)"""
    if not _is_server(state.pid, state.port):
        return False
    if _healthy(state.port, timeout=2):
        return True
    still_starting = state.started_at + START_TIMEOUT - time.time()
    running = lambda: _is_server(state.pid, state.port)  # noqa: E731
    if _wait_healthy(state, time.monotonic() + max(still_starting, 10.0), running):
        return True
    if _in_use(prefect_home):
        raise PrefectServerError(
            f"the Prefect server (pid {state.pid}) does not answer on {state.url} but a "
            f"running ferry command uses it; see {state.log}, or `ferry prefect stop --force`",
            details={"log": state.log, "pid": state.pid},
        )
    return False


# ---- stop ----------------------------------------------------------------------------------


def _terminate(state: ServerState) -> None:
    """SIGTERM the recorded group (watchdog + server), SIGKILL what outlives the grace."""
    server = _is_server(state.pid, state.port)
    if _is_watchdog(state.pgid, state.port) or (server and _pgid(state.pid) == state.pgid):
        kill: Callable[[int], None] = lambda sig: os.killpg(state.pgid, sig)  # noqa: E731
    elif server:
        kill = lambda sig: os.kill(state.pid, sig)  # noqa: E731
    else:
        return
    with contextlib.suppress(ProcessLookupError):
        kill(signal.SIGTERM)
    if not _wait_gone(lambda: _is_server(state.pid, state.port), STOP_GRACE):
        with contextlib.suppress(ProcessLookupError):
            kill(signal.SIGKILL)
        _wait_gone(lambda: _is_server(state.pid, state.port), 5.0)


def _wait_gone(alive: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


# ---- the watchdog --------------------------------------------------------------------------


def watch(prefect_home: Path, port: int, interval: float) -> int:
    """The watchdog's life: start the server as a child, stop it once idle, reap it."""
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port", str(port)]
    server = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sys.stderr)
    print(server.pid, flush=True)  # to ensure_server, which then closes the pipe
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        while True:
            try:
                server.wait(timeout=interval)
                _say(f"the Prefect server (pid {server.pid}) exited ({server.returncode})")
                return 0
            except subprocess.TimeoutExpired:
                pass
            if _stopped_for_idleness(prefect_home, server):
                return 0
    finally:
        _end_child(server)
        # Forget the state file if it names us, unless a command holds the lock: that one
        # may be waiting for this very server to answer, and a stale file is harmless
        # (the next command sees the PID gone and starts anew).
        with _locked(prefect_home, wait=False) as locked:
            state = _read(prefect_home) if locked else None
            if state is not None and state.pgid == os.getpid():
                _forget(prefect_home)


def _stopped_for_idleness(prefect_home: Path, server: subprocess.Popen[bytes]) -> bool:
    with _locked(prefect_home):
        state = _read(prefect_home)
        if state is None or state.pgid != os.getpid():
            _say("the state file no longer names this server: stopping it")
            _end_child(server)
            return True
        now = time.time()
        if _in_use(prefect_home):
            _write(prefect_home, replace(state, last_used=now))
            return False
        idle = now - state.last_used
        if idle < state.idle_seconds:
            return False
        _say(f"idle {idle:.0f} s (limit {state.idle_seconds:.0f} s): stopping the server")
        _end_child(server)
        _forget(prefect_home)
        return True


def _end_child(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    server.terminate()
    try:
        server.wait(STOP_GRACE)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _say(message: str) -> None:
    print(f"== {_now_iso()} ferry watchdog: {message}", file=sys.stderr, flush=True)


# ---- state, locks, processes ---------------------------------------------------------------

_held: dict[Path, int] = {}
_children: list[subprocess.Popen[bytes]] = []


@contextlib.contextmanager
def _locked(prefect_home: Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold server.lock (yield True); with `wait=False`, yield False if another holds it."""
    with open(prefect_home / LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _hold(prefect_home: Path) -> None:
    if prefect_home in _held:
        return
    fd = os.open(prefect_home / IN_USE, os.O_RDWR | os.O_CREAT, 0o600)  # not inherited
    fcntl.flock(fd, fcntl.LOCK_SH)
    _held[prefect_home] = fd


def _in_use(prefect_home: Path) -> bool:
    fd = os.open(prefect_home / IN_USE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the exclusive lock if we got it
    return False


def _read(prefect_home: Path) -> ServerState | None:
    try:
        return ServerState.from_file(json.loads((prefect_home / STATE).read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None  # unreadable: treated as stale, a fresh server replaces it


def _write(prefect_home: Path, state: ServerState) -> None:
    tmp = prefect_home / f"{STATE}.tmp"
    tmp.write_text(json.dumps(state.to_file(), indent=2) + "\n")
    tmp.replace(prefect_home / STATE)  # atomic: `status` reads without the lock


def _forget(prefect_home: Path) -> None:
    (prefect_home / STATE).unlink(missing_ok=True)


def _cmdline(pid: int) -> list[str]:
    """The live process's argv ([] when gone or a zombie)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our own finished child
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")[:-1]


def _is_server(pid: int, port: int) -> bool:
    argv = _cmdline(pid)
    return "prefect" in argv and "server" in argv and "start" in argv and str(port) in argv


def _is_watchdog(pid: int, port: int) -> bool:
    argv = _cmdline(pid)
    return "orchestrator.prefect_server" in argv and "--watch" in argv and str(port) in argv


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _healthy(port: int, *, timeout: float) -> bool:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/api/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise BadInput(f"{name}={raw!r}: expected a number of seconds above 0")
    return value


def _tail(path: Path, size: int = 4000) -> str:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")
    return ""


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Ferry's watchdog of its warm Prefect server")
    parser.add_argument("--watch", type=Path, required=True, help="the Prefect home")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interval", type=float, default=DEFAULT_WATCH_INTERVAL)
    args = parser.parse_args(argv)
    return watch(args.watch, args.port, args.interval)


if __name__ == "__main__":
    sys.exit(main())
