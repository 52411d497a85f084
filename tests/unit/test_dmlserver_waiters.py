"""The DML server carries many long-polls (issue 12): a change wakes only the long-polls of
the hosts whose desired state changed, a waiting long-poll reads nothing from the CMS, every
waiter is answered "no change" before its poll's length, and a tick's heartbeats are one
transaction. The real app (Starlette, in process over ASGI) on a real SQLite CMS."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine

from orchestrator import pullstate
from orchestrator.dmlserver import app as server
from orchestrator.dmlserver.app import Changes, ServerState, make_app

HOSTS = [f"sim-{i}" for i in range(300)]
WAIT = 10  # each long-poll's length (s)


@contextlib.contextmanager
def counting(what: str):  # type: ignore[no-untyped-def]
    """The SQL statements any engine runs while inside (an executemany as `… ×rows`)."""
    seen: list[str] = []

    def before(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        rows = len(params) if executemany else 1
        seen.append(" ".join(statement.split()) + (f" ×{rows}" if rows > 1 else ""))

    event.listen(Engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(Engine, "before_cursor_execute", before)


@pytest.fixture
def cms(ferry_home: Path) -> str:
    from orchestrator.settings import get_settings

    return get_settings().cms_url


async def _serve(cms: str, cache: Path, body) -> Any:  # type: ignore[no-untyped-def]
    app = make_app(cms, dml=None, cache=cache)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://dml") as client:
            return await body(app.state.ferry, client)


def test_a_change_wakes_only_its_hosts_and_everyone_else_hears_no_change_in_time(
    cms: str, ferry_home: Path
) -> None:
    tokens = pullstate.issue_tokens(cms, HOSTS)
    changed = HOSTS[:10]

    async def body(state: ServerState, client: httpx.AsyncClient) -> dict[str, Any]:
        async def poll(host: str) -> tuple[str, float, float, dict[str, Any]]:
            sent = time.monotonic()
            r = await client.get(
                f"/v1/hosts/{host}/desired?after=0&wait={WAIT}",
                headers={"Authorization": f"Bearer {tokens[host]}"},
            )
            assert r.status_code == 200, r.text
            return host, sent, time.monotonic(), r.json()

        t0 = time.monotonic()
        tasks = [asyncio.create_task(poll(h)) for h in HOSTS]
        while sum(len(w) for w in state.waiters.values()) < len(HOSTS):
            assert time.monotonic() - t0 < 30, "the long-polls never all waited"
            await asyncio.sleep(0.05)
        # waiting costs the CMS nothing per waiter: a tick reads only what changed
        with counting("idle") as idle:
            await asyncio.sleep(1.0)
        woken: list[str] = []
        real_wake = state.wake
        state.wake = lambda hosts: (woken.extend(hosts), real_wake(hosts))[1]  # type: ignore[method-assign]
        await asyncio.to_thread(
            pullstate.set_desired, cms, "dev",
            [{"host": h, "purpose": "deploy", "release": None, "release_id": None, "spec": {}}
             for h in changed],
        )  # fmt: skip
        changed_at = time.monotonic()
        with counting("wave") as wave:  # the server's next look, and the answers
            await asyncio.gather(*tasks[:10])
        done = await asyncio.gather(*tasks)
        return {"done": done, "idle": idle, "woken": woken, "wave": wave, "at": changed_at}

    got = asyncio.run(_serve(cms, ferry_home / "cache", body))
    by_host = {h: (sent, back, ans) for h, sent, back, ans in got["done"]}
    for h in changed:  # answered the moment their state changed, with it
        _, back, ans = by_host[h]
        assert ans["changed"] and ans["generation"] > 0 and ans["purpose"] == "deploy", ans
        assert back - got["at"] < 3.0, h  # a tick or so, generous under load
    assert sorted(set(got["woken"])) == sorted(changed)  # nobody else was woken
    # woken, they were answered from what the server's look read: no row per host
    assert not [q for q in got["wave"] if "FROM pull_agents" in q and "host =" in q], got["wave"]
    assert not [q for q in got["wave"] if "FROM pull_desired" in q and "host =" in q]
    for h in HOSTS[10:]:  # "no change" before the poll's length, so the client re-polls
        sent, back, ans = by_host[h]
        assert ans == {"changed": False, "generation": 0, "nudge": 0, "beat": False}, ans
        assert WAIT * 0.8 - 1.0 <= back - sent < WAIT, (h, back - sent)
    # ~4 ticks in the idle second: a few small queries each, not one per waiter
    assert 0 < len(got["idle"]) < 40, got["idle"][:10]
    assert not any("FROM pull_agents WHERE" in q and "host =" in q for q in got["idle"])


def test_a_ticks_heartbeats_are_one_transaction(cms: str, ferry_home: Path) -> None:
    hosts = HOSTS[:50]
    tokens = pullstate.issue_tokens(cms, hosts)

    async def body(state: ServerState, client: httpx.AsyncClient) -> list[str]:
        async def beat(h: str, current: str) -> None:
            r = await client.post(
                f"/v1/hosts/{h}/heartbeat", json={"current": current},
                headers={"Authorization": f"Bearer {tokens[h]}"},
            )  # fmt: skip
            assert r.status_code == 200, r.text

        for h in hosts:  # each token verified once (scrypt), as after an agent's first beat
            await beat(h, "none")
        await asyncio.sleep(server.TICK * 3)
        with counting("beats") as seen:
            await asyncio.gather(*(beat(h, "shop-1.0-aaaaaaaaaaaa") for h in hosts))
            await asyncio.sleep(server.TICK * 3)
        return seen

    seen = asyncio.run(_serve(cms, ferry_home / "cache", body))
    updates = [q for q in seen if q.startswith("UPDATE pull_agents SET heartbeat")]
    # 50 heartbeats in a tick or two: one executemany each, not one transaction a beat
    assert 1 <= len(updates) <= 2, updates
    assert sum(int(q.rpartition("×")[2]) if "×" in q else 1 for q in updates) == 50, updates
    status = {s["host"]: s for s in pullstate.status(cms, hosts)}
    assert all(status[h]["running"] == "shop-1.0-aaaaaaaaaaaa" for h in hosts)
    assert all(status[h]["last_heartbeat"] for h in hosts)


def test_a_look_at_the_cms_wakes_exactly_the_hosts_whose_answer_changed() -> None:
    state = ServerState("sqlite://", None, Path("."))
    state.generations, state.nudges, state.top = {"a": 3, "b": 5}, {"a": 0, "b": 1}, 5
    body = {"generation": 7, "host": "c"}
    assert state.apply(Changes(generations={"c": 7}, bodies={"c": body})) == {"c"}
    assert state.top == 7 and state.bodies["c"] == body
    # an agent row changed: the nudge moved for b only
    rows = {h: pullstate.AgentRow(h, "00", "scrypt:x", False, n) for h, n in (("a", 0), ("b", 2))}
    assert state.apply(Changes(agents=rows, agent_signature=(2, 2, None, None, 0))) == {"b"}
    assert state.agents == rows
    # a resync: a forgotten (deleted) host and one set late under an older generation
    assert state.apply(Changes(full={"a": 4, "c": 7})) == {"a", "b"}
    assert state.generations == {"a": 4, "c": 7} and "a" not in state.bodies
    # a resync read after the incremental look saw a newer generation: the older is ignored
    ch = Changes(generations={"c": 8}, bodies={"c": {"generation": 8}}, full={"a": 4, "c": 9})
    assert state.apply(ch) == {"c"} and state.generations["c"] == 9 and "c" not in state.bodies


def test_a_woken_long_poll_is_answered_only_while_its_token_still_holds(
    cms: str, ferry_home: Path
) -> None:
    """Revoked (or re-issued) while it waited: the wave's answer is refused, 401, logged."""
    tokens = pullstate.issue_tokens(cms, ["h1", "h2"])

    async def body(state: ServerState, client: httpx.AsyncClient) -> dict[str, int]:
        async def poll(host: str) -> int:
            r = await client.get(f"/v1/hosts/{host}/desired?after=0&wait=20",
                                 headers={"Authorization": f"Bearer {tokens[host]}"})  # fmt: skip
            return r.status_code

        tasks = {h: asyncio.create_task(poll(h)) for h in ("h1", "h2")}
        while len(state.waiters) < 2:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(pullstate.revoke, cms, "h2")
        await asyncio.sleep(server.TICK * 3)  # the server's look sees the revocation
        await asyncio.to_thread(
            pullstate.set_desired, cms, "dev",
            [{"host": h, "purpose": "deploy", "release": None, "release_id": None, "spec": {}}
             for h in ("h1", "h2")],
        )  # fmt: skip
        return {h: await t for h, t in tasks.items()}

    assert asyncio.run(_serve(cms, ferry_home / "cache", body)) == {"h1": 200, "h2": 401}


def test_the_servers_tls_connections_read_through_a_small_buffer() -> None:
    import asyncio.sslproto

    from orchestrator import dmlserver

    before = asyncio.sslproto.SSLProtocol.max_size
    try:
        dmlserver._small_tls_buffers()
        assert asyncio.sslproto.SSLProtocol.max_size == dmlserver.TLS_READ_BUFFER == 32 * 1024
    finally:
        asyncio.sslproto.SSLProtocol.max_size = before


def test_a_waiting_long_poll_is_its_hosts_heartbeat(cms: str, ferry_home: Path) -> None:
    """What the long-poll's X-Ferry-Beat says is recorded, and while it waits the host is
    stamped alive again and again without a heartbeat request of its own."""
    tokens = pullstate.issue_tokens(cms, ["h1"])
    beat = '{"current": "shop-1.0-aaaaaaaaaaaa", "pending": null, "agent": "pull"}'

    async def body(state: ServerState, client: httpx.AsyncClient) -> list[Any]:
        poll = asyncio.create_task(client.get(
            "/v1/hosts/h1/desired?after=0&wait=20",
            headers={"Authorization": f"Bearer {tokens['h1']}", "X-Ferry-Beat": beat},
        ))  # fmt: skip
        stamps = []
        for _ in range(3):
            await asyncio.sleep(server.BEAT_TICKS * server.TICK + 0.3)
            stamps.append(await asyncio.to_thread(pullstate.status, cms, ["h1"]))
        bad = await client.get("/v1/hosts/h1/desired?after=0&wait=1",
                               headers={"Authorization": f"Bearer {tokens['h1']}",
                                        "X-Ferry-Beat": "[1, 2]"})  # fmt: skip
        plain = await client.get("/v1/hosts/h1/desired?after=0&wait=1",
                                 headers={"Authorization": f"Bearer {tokens['h1']}"})  # fmt: skip
        poll.cancel()  # no need to wait out its 20 s
        return [stamps, bad.status_code, plain.json()]

    stamps, bad, plain = asyncio.run(_serve(cms, ferry_home / "cache", body))
    assert bad == 400
    assert plain["beat"] is False  # no X-Ferry-Beat: the agent must post its heartbeats
    assert [s[0]["running"] for s in stamps] == ["shop-1.0-aaaaaaaaaaaa"] * 3
    beats = [s[0]["last_heartbeat"] for s in stamps]
    assert beats[0] is not None and beats[0] < beats[1] < beats[2], beats  # stamped, again


def test_a_long_poll_whose_agent_hung_up_stops_waiting_at_once(cms: str, ferry_home: Path) -> None:
    """On real uvicorn: the connection closed, the host no longer counts as waiting (so it
    is no longer stamped alive), long before its poll's length."""
    import socket
    import threading

    import uvicorn

    tokens = pullstate.issue_tokens(cms, ["h1"])
    app = make_app(cms, dml=None, cache=ferry_home / "cache")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not srv.started:
            assert time.monotonic() < deadline, "uvicorn never started"
            time.sleep(0.05)
        state: ServerState = app.state.ferry
        conn = socket.create_connection(("127.0.0.1", port))
        conn.sendall(
            f"GET /v1/hosts/h1/desired?after=0&wait=60 HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {tokens['h1']}\r\n\r\n".encode()
        )
        while "h1" not in state.waiters:
            assert time.monotonic() < deadline, "the long-poll never waited"
            time.sleep(0.05)
        conn.close()
        hung_up = time.monotonic()
        while "h1" in state.waiters:
            assert time.monotonic() - hung_up < 3, "a hung-up long-poll kept waiting"
            time.sleep(0.05)
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
    assert not thread.is_alive()


def test_a_known_token_costs_no_row_read_and_a_revoked_one_is_refused_within_ticks(
    cms: str, ferry_home: Path
) -> None:
    tokens = pullstate.issue_tokens(cms, ["h1", "h2"])

    async def body(state: ServerState, client: httpx.AsyncClient) -> dict[str, Any]:
        async def poll(host: str, token: str) -> int:
            r = await client.get(f"/v1/hosts/{host}/desired?after=-1&wait=1",
                                 headers={"Authorization": f"Bearer {token}"})  # fmt: skip
            return r.status_code

        first = await poll("h1", tokens["h1"])  # checked against its row: scrypt, once
        await asyncio.sleep(server.TICK * 3)  # a look that has read h1's row
        with counting("known") as known:
            again = [await poll("h1", tokens["h1"]) for _ in range(5)]
        forged = await poll("h1", "h1." + "0" * 43)  # refused from the CMS's own row
        await asyncio.to_thread(pullstate.revoke, cms, "h1")
        await asyncio.sleep(server.TICK * 3)  # the next look sees the revocation
        revoked = await poll("h1", tokens["h1"])
        fresh, server.FRESH = server.FRESH, -1.0  # as if the CMS was not read for a while:
        try:  # back to the row, every time
            with counting("stale") as stale:
                other = await poll("h2", tokens["h2"])
        finally:
            server.FRESH = fresh
        return {"first": first, "again": again, "known": known, "forged": forged,
                "revoked": revoked, "other": other, "stale": stale}  # fmt: skip

    got = asyncio.run(_serve(cms, ferry_home / "cache", body))
    assert got["first"] == 200 and got["again"] == [200] * 5 and got["other"] == 200
    assert not [q for q in got["known"] if "pull_agents" in q and "host =" in q], got["known"]
    assert [q for q in got["stale"] if "pull_agents" in q and "host =" in q], got["stale"]
    assert got["forged"] == 401 and got["revoked"] == 401


def test_the_listening_socket_gives_every_connection_keepalive_and_a_taken_port_is_exit_2() -> None:
    """An agent gone without a FIN stops counting as a waiting (alive) host: the kernel's
    keepalive probes find it. Accepted connections inherit the options on this kernel."""
    import socket

    from orchestrator import dmlserver
    from orchestrator.errors import BadInput

    sock = dmlserver.listen_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = sock.accept()
            with conn:
                assert conn.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
                got = {n: conn.getsockopt(socket.IPPROTO_TCP, getattr(socket, n))
                       for n in dmlserver.KEEPALIVE}  # fmt: skip
                assert got == dmlserver.KEEPALIVE
                assert client  # the connection stood while its options were read
        with pytest.raises(BadInput, match=rf"--listen 127.0.0.1:{port}: cannot listen there"):
            dmlserver.listen_socket("127.0.0.1", port)
    finally:
        sock.close()


def test_every_resync_reads_the_agent_rows_even_when_their_signature_stands_still(
    cms: str, ferry_home: Path
) -> None:
    """A token re-issued under a clock that stepped back leaves the signature as it was:
    the resync (every 10 s) still reads the rows, so a rotated token holds at most that."""
    pullstate.issue_tokens(cms, ["h1"])
    state = ServerState(cms, None, ferry_home / "cache")
    sig = pullstate.agent_signature(cms)
    assert state.read(0, sig, resync=False).agents is None
    rows = state.read(0, sig, resync=True).agents
    assert rows is not None and set(rows) == {"h1"}


def test_a_stop_records_the_heartbeats_of_its_last_tick(
    cms: str, ferry_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "TICK", 60.0)  # no tick writes them: only the stop can
    tokens = pullstate.issue_tokens(cms, ["h1", "h2"])

    async def body(state: ServerState, client: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.2)  # the watcher's first look is done; its next is a minute off
        for h in ("h1", "h2"):
            r = await client.post(
                f"/v1/hosts/{h}/heartbeat", json={"current": f"shop-{h}"},
                headers={"Authorization": f"Bearer {tokens[h]}"},
            )  # fmt: skip
            assert r.status_code == 200, r.text
        assert set(state.beats) == {"h1", "h2"}  # answered, not yet written

    asyncio.run(_serve(cms, ferry_home / "cache", body))
    status = {s["host"]: s for s in pullstate.status(cms, ["h1", "h2"])}
    assert {h: status[h]["running"] for h in status} == {"h1": "shop-h1", "h2": "shop-h2"}
    assert all(status[h]["last_heartbeat"] for h in status)


def test_a_releases_contents_are_served_only_to_an_installed_hosts_token(
    cms: str, ferry_home: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import hashlib
    import logging

    caplog.set_level(logging.WARNING, logger="ferry.dmlserver")

    tokens = pullstate.issue_tokens(cms, ["h1", "h2"])
    data = b"the release's own bytes"
    sha = hashlib.sha256(data).hexdigest()
    (ferry_home / "cache" / "objects").mkdir(parents=True)
    (ferry_home / "cache" / "objects" / sha).write_bytes(data)

    async def body(state: ServerState, client: httpx.AsyncClient) -> dict[str, Any]:
        async def get(path: str, token: str | None) -> tuple[int, bytes]:
            headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
            r = await client.get(path, headers=headers)
            return r.status_code, r.content

        obj, manifest = f"/v1/objects/{sha}", "/v1/releases/shop-1.0-aaaaaaaaaaaa/manifest"
        got = {
            "anonymous": await get(obj, None),
            "anonymous manifest": await get(manifest, None),
            "forged": await get(obj, "h1." + "0" * 43),
            "malformed": await get(obj, "nonsense"),
            "empty": await get(obj, ""),
            # h1's secret pasted with something after a dot: its "host" holds the secret
            "pasted": await get(obj, tokens["h1"] + ".x"),
            "h1": await get(obj, tokens["h1"]),
            "h2": await get(obj, tokens["h2"]),  # any installed host: objects are not per host
        }
        await asyncio.to_thread(pullstate.revoke, cms, "h2")
        await asyncio.sleep(server.TICK * 3)  # the next look sees the revocation
        got["revoked"] = await get(obj, tokens["h2"])
        return got

    got = asyncio.run(_serve(cms, ferry_home / "cache", body))
    assert got["h1"] == (200, data) and got["h2"] == (200, data)
    refusals = ("anonymous", "anonymous manifest", "forged", "malformed", "empty", "pasted",
                "revoked")  # fmt: skip
    for refused in refusals:
        status, content = got[refused]
        assert status == 401 and data not in content, (refused, got[refused])
    logged = [r.getMessage() for r in caplog.records if r.name == "ferry.dmlserver"]
    assert len([m for m in logged if m.startswith("refused")]) == len(refusals), logged
    secrets = [t.split(".", 1)[1] for t in tokens.values()]
    assert not [m for m in logged for secret in secrets if secret in m], logged
