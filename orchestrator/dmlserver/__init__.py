"""`ferry dml serve`: the DML over HTTPS for pull agents (orchestrator.dmlserver.app)."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Any

from orchestrator.errors import BadInput


def parse_listen(listen: str) -> tuple[str, int]:
    """ADDR:PORT (an IPv4 address, or [IPv6]) → (address, port), or exit 2 saying how."""
    addr, sep, port = listen.rpartition(":")
    addr = addr.strip("[]")
    try:
        ipaddress.ip_address(addr)
        number = int(port)
        if not sep or not 1 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise BadInput(
            f"--listen {listen!r}: give ADDR:PORT, e.g. 198.18.0.1:8443 (`ferry lab status` "
            "names the gateway address lab hosts reach)"
        ) from None
    return addr, number


# asyncio gives every TLS connection a read buffer of SSLProtocol.max_size (256 KiB): 10,000
# waiting long-polls held ~3.3 GiB for requests of a few hundred bytes. A TLS record is at
# most 16 KiB, so 32 KiB still takes two records a read; what the server sends (objects) is
# not read through it.
TLS_READ_BUFFER = 32 * 1024

# SIGTERM (a service manager's stop or restart): the listening socket closes, every waiting
# long-poll is answered "no change" at once (its agent polls again and finds the restarted
# server), and transfers in flight get this long to finish before they are cut. Without it a
# long-poll held the stop for its whole length (up to MAX_WAIT, 300 s), and a client that kept
# an answered connection open without reading held it for asyncio's TLS close timeout (30 s).
SHUTDOWN_GRACE = 10.0
# …and a connection whose answer was sent and closed, but whose peer has not hung up this
# long after the stop, is dropped then (not held the grace): it is not reading
ANSWERED_LINGER = 1.0


# A waiting long-poll stamps its host alive; an agent gone without a FIN (power lost, a
# partition, a NAT that forgot it) must stop counting before the milestone's 3 heartbeats
# (30 s by default). Kernel keepalive on every accepted connection (inherited from the
# listening socket): a dead peer is found after 10 s idle + 3 probes 5 s apart, ~25 s.
KEEPALIVE = {"TCP_KEEPIDLE": 10, "TCP_KEEPINTVL": 5, "TCP_KEEPCNT": 3}


def listen_socket(addr: str, port: int, backlog: int = 4096) -> socket.socket:
    """The server's listening socket, keepalive on, or exit 2 saying what holds the port."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE.items():
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    try:
        sock.bind((addr, port))
    except OSError as exc:
        sock.close()
        raise BadInput(
            f"--listen {addr}:{port}: cannot listen there ({exc.strerror}); choose a free port "
            "or an address of this machine"
        ) from None
    sock.listen(backlog)
    return sock


def _small_tls_buffers() -> None:
    import asyncio.sslproto

    if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def serve(listen: str, *, insecure_http: bool, progress: Callable[[str], None]) -> None:
    import uvicorn

    from dml.store import DML
    from orchestrator.dmlserver import tls
    from orchestrator.dmlserver.app import make_app
    from orchestrator.settings import get_settings

    addr, port = parse_listen(listen)
    sock = listen_socket(addr, port)  # before anything is said or made: a taken port is exit 2
    settings = get_settings()
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(settings.log_dir / "dmlserver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log = logging.getLogger("ferry.dmlserver")
    log.addHandler(handler)
    log.addHandler(logging.StreamHandler())
    log.setLevel(logging.INFO)
    app = make_app(settings.cms_url, DML.from_settings(), settings.home / "dmlserver")
    options: dict[str, object] = {}
    scheme = "http"
    if not insecure_http:
        cert, key = tls.server_certificate(settings.home, [addr])
        options = {"ssl_certfile": str(cert), "ssl_keyfile": str(key)}
        scheme = "https"
    progress(
        f"serving the DML on {scheme}://{listen}"
        + ("" if insecure_http else f" (CA: {tls.pki_dir(settings.home) / 'ca.pem'})")
    )
    _small_tls_buffers()
    config = uvicorn.Config(
        app, host=addr, port=port, log_level="warning", access_log=False,
        timeout_keep_alive=75, backlog=4096, timeout_graceful_shutdown=SHUTDOWN_GRACE,
        **options,  # type: ignore[arg-type]
    )  # fmt: skip
    _stopping_server(config, app.state).run(sockets=[sock])


def _stopping_server(config: Any, app_state: Any) -> Any:
    """uvicorn's server, whose stop first answers the waiting long-polls and, a moment
    later (ANSWERED_LINGER), hangs up the connections answered and closed whose peers still
    owe a TLS close reply; uvicorn drains the rest within SHUTDOWN_GRACE. Made here:
    uvicorn loads lazily."""
    import asyncio

    import uvicorn

    class StoppingServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            state = getattr(app_state, "ferry", None)
            if state is not None:  # set by the app's start, which a stop follows: defensive
                state.close()
            # each connection's socket, asked now: uvicorn's shutdown closes every
            # transport again, and asyncio's TLS transport then no longer says
            held = {conn: _socket_of(conn) for conn in self.server_state.connections}
            asyncio.get_running_loop().call_later(ANSWERED_LINGER, self.hang_up, held)
            await super().shutdown(sockets)

        def hang_up(self, held: dict[Any, Any]) -> None:
            for conn, sock in held.items():
                transport = getattr(conn, "transport", None)
                if sock is None or conn not in self.server_state.connections:
                    continue
                if transport is not None and transport.is_closing():
                    # answered and closed: only the peer's TLS close reply is awaited, and a
                    # reading peer would have sent it by now. The kernel still delivers what
                    # the socket's buffer holds, then the FIN ends the wait.
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    return StoppingServer(config)


def _socket_of(conn: Any) -> Any:
    """The connection's TCP socket, or None (a transport already gone)."""
    try:
        return conn.transport.get_extra_info("socket")
    except AttributeError:
        return None
