"""A throwaway PostgreSQL server for tests, and the fixtures that hand it out.

Any test area can use it:

    from tests.pg import postgres_server, postgres_url, fresh_postgres_url  # noqa: F401

- `postgres_server` (session): a `PostgresServer` running on 127.0.0.1 on a free port.
- `postgres_url` (session): SQLAlchemy URL of the shared database `ferry_test`.
- `fresh_postgres_url` (function): URL of a new, empty database, dropped after the test.

The cluster is initdb'd into a temporary directory owned by the `postgres` system user
(PostgreSQL refuses to run as root), with fsync off and no sync at initdb: it holds nothing
worth keeping. Only 127.0.0.1 (password, scram) and the unix socket in that directory (trust;
the directory is private to the `postgres` user) can connect. One server serves the whole
test process however many conftests import these fixtures; it is stopped by its postmaster's
PID and its directory removed at the end of the session, and at exit if a session dies first.

When the PostgreSQL binaries are missing the fixtures FAIL (they do not skip): CI installs
them with `.ci/bootstrap`, and a silently skipped backend is an untested backend.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SYSTEM_USER = "postgres"
SUPERUSER = "postgres"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL binaries are missing or the test server would not start."""


def find_bindir() -> Path:
    """The newest PostgreSQL's bin directory (Debian layout), or `pg_ctl` on PATH."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", Path(path).parent.name)) or (0,)

    for candidate in sorted(glob.glob(PG_BIN_GLOB), key=version, reverse=True):
        if all((Path(candidate) / tool).exists() for tool in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    on_path = shutil.which("pg_ctl")
    if on_path and (Path(on_path).parent / "initdb").exists():
        return Path(on_path).parent
    raise PostgresUnavailable(
        f"PostgreSQL server binaries not found ({PG_BIN_GLOB}/initdb, or pg_ctl on PATH); "
        "run `bash .ci/bootstrap` (as root) to install the postgresql package"
    )


def _run_as() -> pwd.struct_passwd | None:
    """Whom to run the server as: the `postgres` system user when we are root, else us."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home",
             "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True, capture_output=True,
        )  # fmt: skip
        return pwd.getpwnam(SYSTEM_USER)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie left for init to reap counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    password: str
    user: pwd.struct_passwd | None = None
    pid: int | None = None
    host: str = "127.0.0.1"
    _created: list[str] = field(default_factory=list)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database on this server."""
        return (
            f"postgresql+psycopg://{SUPERUSER}:{self.password}@{self.host}:{self.port}/{database}"
        )

    def dsn(self, database: str = "postgres") -> str:
        return (
            f"host={self.host} port={self.port} user={SUPERUSER} "
            f"password={self.password} dbname={database}"
        )

    # -- databases -------------------------------------------------------------------------

    def create_database(self, name: str | None = None, *, exist_ok: bool = False) -> str:
        """Create an empty database (a unique name unless given); return its URL."""
        import psycopg
        from psycopg import sql

        name = name or f"t_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists and not exist_ok:
                raise PostgresUnavailable(f"database {name} already exists")
            if not exists:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8'").format(
                        sql.Identifier(name)
                    )
                )
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, closing whatever connections a test left open on it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- lifecycle -------------------------------------------------------------------------

    def _tool(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        kw: dict = {}
        if self.user is not None:
            kw = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
        proc = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout, **kw,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise PostgresUnavailable(
                f"{args[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout}"
                + self._log_tail()
            )
        return proc.stdout

    def _log_tail(self) -> str:
        try:
            return "\nserver log:\n" + "\n".join(self.logfile.read_text().splitlines()[-20:])
        except OSError:
            return ""

    def init(self) -> None:
        pwfile = self.root / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.password + "\n")
        if self.user is not None:
            for path in (self.root, pwfile):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self.root.chmod(0o700)
        self._tool(
            "initdb", "-D", str(self.datadir), "-U", SUPERUSER, f"--pwfile={pwfile}",
            "--auth-local=trust", "--auth-host=scram-sha-256",
            "--no-sync", "--encoding=UTF8", "--locale=C", "--no-instructions",
        )  # fmt: skip
        pwfile.unlink()
        # 127.0.0.1 only, by password; the socket lives in the private temp directory
        (self.datadir / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )
        with (self.datadir / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# Ferry test cluster: throwaway, so durability is switched off for speed\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.root}'\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
                "max_connections = 100\nlog_min_messages = warning\n"
            )

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            try:
                self._tool(
                    "pg_ctl", "-D", str(self.datadir), "-l", str(self.logfile),
                    "-o", f"-p {self.port}", "-w", "-t", "60", "-s", "start",
                    timeout=90,
                )  # fmt: skip
                break
            except PostgresUnavailable:
                # the free port we picked may have been taken meanwhile: pick another
                if attempt == attempts - 1 or "could not bind" not in self._log_tail():
                    raise
                self.port = _free_port()
        self.pid = int((self.datadir / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        """Stop this server (fast shutdown, then by its postmaster PID) and remove its files."""
        try:
            if self.pid is not None and _alive(self.pid):
                try:
                    self._tool(
                        "pg_ctl", "-D", str(self.datadir), "-m", "fast", "-w", "-t", "30",
                        "-s", "stop", timeout=45,
                    )  # fmt: skip
                except (PostgresUnavailable, subprocess.TimeoutExpired):
                    pass
                for sig in (signal.SIGQUIT, signal.SIGKILL):
                    if not _alive(self.pid):
                        break
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
                    deadline = time.monotonic() + 10
                    while _alive(self.pid) and time.monotonic() < deadline:
                        time.sleep(0.05)
        finally:
            self.pid = None
            shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """initdb a throwaway cluster in a new temp directory and start it; clean up on failure."""
    bindir = find_bindir()
    user = _run_as()
    base = None if len(tempfile.gettempdir()) < 60 else "/tmp"  # unix socket paths are short
    root = Path(tempfile.mkdtemp(prefix="ferry-pg-", dir=base))
    server = PostgresServer(bindir, root, _free_port(), secrets.token_hex(16), user)
    try:
        server.init()
        server.start()
    except BaseException:
        server.stop()
        raise
    return server


# -- one server per test process, however many conftests import the fixtures ---------------

_lock = threading.Lock()
_server: PostgresServer | None = None
_users = 0


def acquire_server() -> PostgresServer:
    global _server, _users
    with _lock:
        if _server is None:
            _server = start_server()
            atexit.register(_server.stop)
        _users += 1
        return _server


def release_server() -> None:
    global _server, _users
    with _lock:
        _users -= 1
        if _users == 0 and _server is not None:
            _server.stop()
            atexit.unregister(_server.stop)
            _server = None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A running PostgreSQL server on 127.0.0.1 for the whole session (FAILS if not installed)."""
    try:
        server = acquire_server()
    except PostgresUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        release_server()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """`postgresql+psycopg://…@127.0.0.1:PORT/ferry_test`, shared by the whole session."""
    return postgres_server.create_database("ferry_test", exist_ok=True)


@pytest.fixture
def fresh_postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A new empty database for one test; dropped (connections and all) afterwards."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url.rsplit("/", 1)[1])
