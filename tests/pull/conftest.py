"""Pull deployment tests: the real 12-host fleet, a real `ferry dml serve` on the fleet's
gateway, a real agent daemon on every host (installed by `ferry agent install`)."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FERRY_BIN
from tests.fleet.fixtures import small_fleet  # noqa: F401
from tests.prefect_server import prefect_api  # noqa: F401


@dataclass
class Server:
    """`ferry dml serve` in a child process of its own session, ended by its pid."""

    listen: str
    home: Path
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"https://{self.listen}"

    @property
    def ca(self) -> Path:
        return self.home / "pki" / "ca.pem"

    def start(self, *extra: str) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(FERRY_BIN), "dml", "serve", "--listen", self.listen, *extra],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ}, cwd=os.getcwd(),
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                ctx = ssl.create_default_context(cafile=str(self.ca)) if not extra else None
                scheme = "http" if extra else "https"
                with urllib.request.urlopen(
                    f"{scheme}://{self.listen}/v1/health", timeout=2, context=ctx
                ) as r:
                    if r.status == 200:
                        return
            except (OSError, ssl.SSLError):
                pass
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.3)

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=30)
        self.proc = None


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def stop_agents(fleet) -> None:  # type: ignore[no-untyped-def]
    """End every host's agent daemon by the pid file its install wrote (never by name)."""
    for h in fleet.hosts:
        pidfile = fleet.root_dir(h) / ".ferry" / "pull" / "daemon.pid"
        if pidfile.exists():
            try:
                os.killpg(int(pidfile.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
            pidfile.unlink()


@pytest.fixture
def pull_fleet(small_fleet, prefect_api, ferry_home):  # noqa: F811
    small_fleet.wipe()
    yield small_fleet
    stop_agents(small_fleet)
    small_fleet.wipe()


@pytest.fixture
def dml_server(pull_fleet, ferry_home) -> Iterator[Server]:
    gateway = pull_fleet.status()["gateway"]
    server = Server(
        f"{gateway}:{_free_port(gateway)}", ferry_home / ".ferry", ferry_home / "dmlserver.out"
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
