"""`ferry dml serve` stops promptly on SIGTERM (a service manager's stop, a restart): it
answers every waiting long-poll at once ("no change": the agent polls again, and finds the
restarted server), lets what is in flight finish within its grace, and does not wait on a
client that holds a finished connection open. A real server process over TLS, a real CMS."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path

from orchestrator import pullstate
from orchestrator.dmlserver import SHUTDOWN_GRACE
from orchestrator.settings import get_settings
from tests.pull.conftest import Server, _free_port


def test_sigterm_answers_waiting_long_polls_and_exits_within_its_grace(ferry_home: Path) -> None:
    server = Server(
        f"127.0.0.1:{_free_port('127.0.0.1')}", ferry_home / ".ferry", ferry_home / "dml.out"
    )
    server.start()
    held: ssl.SSLSocket | None = None
    try:
        token = pullstate.issue_token(get_settings().cms_url, "h1")
        answered: dict[str, object] = {}

        def long_poll() -> None:  # an agent with `pull.poll: 120s` (up to 300 s is allowed)
            req = urllib.request.Request(f"{server.url}/v1/hosts/h1/desired?after=0&wait=120")
            req.add_header("Authorization", f"Bearer {token}")
            req.add_header("X-Ferry-Beat", json.dumps({"current": "shop-1"}))
            ctx = ssl.create_default_context(cafile=str(server.ca))
            with urllib.request.urlopen(req, timeout=200, context=ctx) as r:
                answered["answer"] = (r.status, json.loads(r.read()))
            answered["at"] = time.monotonic()

        poller = threading.Thread(target=long_poll, daemon=True)
        poller.start()
        # a client that asked, got its answer sent, and holds the connection without reading
        # (an agent asleep in its back-off): the server's TLS close waits on its reply
        ctx = ssl.create_default_context(cafile=str(server.ca))
        host, port = server.listen.rsplit(":", 1)
        held = ctx.wrap_socket(socket.create_connection((host, int(port))), server_hostname=host)
        ask = f"GET /v1/health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        held.sendall(ask.encode())
        answer = b""
        while chunk := held.recv(65536):  # to the server's close (TLS close_notify), unanswered
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer
        # the long-poll is past its token check and waiting: its heartbeat reached the CMS
        deadline = time.monotonic() + 30
        while not pullstate.status(get_settings().cms_url, ["h1"])[0]["last_heartbeat"]:
            assert time.monotonic() < deadline, "the long-poll never reached the server"
            time.sleep(0.1)
        assert poller.is_alive() and server.proc is not None
        stopped = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=SHUTDOWN_GRACE + 30)
        took = time.monotonic() - stopped
        poller.join(timeout=5)
        assert answered, "the waiting long-poll was never answered"
        status, body = answered["answer"]  # type: ignore[misc]
        assert status == 200 and body["changed"] is False, body
        assert float(answered["at"]) - stopped < 3.0, "the long-poll was not answered at once"  # type: ignore[arg-type]
        # nothing was in flight: no wait for the grace, nor for the held connection's reply
        # beyond ANSWERED_LINGER (1 s)
        assert took < SHUTDOWN_GRACE * 0.7, f"the server took {took:.1f} s to exit"
        assert "Traceback" not in server.log.read_text()
        # ended by the signal it was sent, as uvicorn does (a service manager's clean stop)
        assert server.proc.returncode == -signal.SIGTERM, server.log.read_text()
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
        if held is not None:
            held.close()
