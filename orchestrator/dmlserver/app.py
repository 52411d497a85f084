"""The DML server (Act): signed manifests, content-addressed objects and the desired-state
API of the pull method, as one ASGI app (Starlette) that `ferry dml serve` runs on uvicorn.

    GET  /v1/health
    GET  /v1/releases/<release-id>/manifest | /signature   signed, immutable
    GET  /v1/objects/<sha256>                              one file's bytes (range requests)
    GET  /v1/hosts/<host>/desired?after=N&wait=S           long-poll: answers the moment the
                                                           host's desired state passes N
    POST /v1/hosts/<host>/reports                          step and check results
    POST /v1/hosts/<host>/heartbeat                        alive, apart from outcomes

A waiting long-poll is the host's heartbeat: its request carries what a heartbeat says
(`X-Ferry-Beat`, JSON), and while it waits on an open connection the server stamps the host
alive every BEAT_TICKS ticks, so an idle fleet sends one request per poll, not one per
heartbeat too (10,000 agents at a 10 s heartbeat were 1,000 requests a second). The agent
posts heartbeats only while it is not long-polling (applying, between polls), or until an
answer has said its poll counted (`"beat": true`). A long-poll whose agent hung up stops
counting at once (the server listens for the hang-up); one gone without a FIN, within
~25 s (kernel keepalive on every connection, orchestrator/dmlserver/__init__.py).

Every request but the health check needs a host's token (Bearer). The host API needs the
host's own; manifests and objects, any installed host's: they are signed and content-
addressed (the agent checks the signature with its pinned DML key and every sha256 before
anything runs), but a release's contents are nobody else's to read. A token of another
host, a forged or a revoked one is refused with 401/403 and logged — the host, the path
and the reason, never the token. The desired state and the reports live
in the CMS; the server holds nothing a restart could lose.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from orchestrator import pullstate
from orchestrator.cms.models import utcnow

log = logging.getLogger("ferry.dmlserver")
_SHA = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")
STOP_WRITE = 5.0  # the stop's last heartbeat write waits no longer on a CMS that hangs
TICK = 0.25  # how often the server looks for changed desired state in the CMS
RESYNC = 40  # every 10 s, every host's generation (catches a forgotten host)
BEAT_TICKS = 8  # every 2 s, the hosts with a waiting long-poll are stamped alive
BEAT_KEYS = ("current", "pending", "applying", "backed_out", "agent")
# a known token is accepted from the agent rows of the server's last look, if that look is
# this recent; else (the CMS not read for a while) from its own row, as a new one always is
FRESH = 2.0
# SQLAlchemy's default pool is 5 connections + 10 overflow: requests get 13 worker threads,
# the watcher 2 of its own, so a burst of requests never delays a look, a wake or a stamp
REQUEST_THREADS, WATCHER_THREADS = 13, 2
# a long-poll's longest wait: a large fleet polls long (`pull.poll: 300s`), since every
# re-poll costs the server ~4 ms of CPU in its Python TLS and HTTP stack on this machine
MAX_WAIT = 300.0
# private: every such answer needs a host's token, and a shared cache (a proxy) may keep a
# `public` answer to a request that carried one and hand it to anyone
IMMUTABLE = {"Cache-Control": "private, max-age=31536000, immutable"}


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class Changes:
    """What one look at the CMS found: the hosts whose answer changed, and their new state."""

    generations: dict[str, int] = field(default_factory=dict)
    bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    full: dict[str, int] | None = None  # every host's generation (a resync), or None
    agents: dict[str, pullstate.AgentRow] | None = None  # every agent, when any changed
    agent_signature: tuple[Any, ...] | None = None


class ServerState:
    """What the server knows between two looks at the CMS, and who waits for what.

    One watcher reads the CMS each tick for every connection: only the desired states set
    since the highest generation it has seen (generations grow across all hosts), a cheap
    (agents, sum of nudges) signature before it reads any nudge, and every host's
    generation once every RESYNC ticks (a forgotten host, a transaction that committed
    late). It wakes only the long-polls of the hosts whose answer changed, and writes the
    tick's heartbeats in one transaction. A waiting long-poll costs a future and a timer:
    no task, no CMS read.
    """

    def __init__(self, cms_url: str, dml: Any, cache: Path) -> None:
        self.url = cms_url
        self.dml = dml
        self.cache = cache
        self.generations: dict[str, int] = {}
        self.nudges: dict[str, int] = {}
        self.top = 0  # the highest generation seen
        self.bodies: dict[str, dict[str, Any]] = {}  # answers read since they changed
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}
        self.beats: dict[str, tuple[datetime, dict[str, Any]]] = {}
        self.agents: dict[str, pullstate.AgentRow] = {}  # as of the last look
        self._agent_signature: tuple[Any, ...] | None = None
        self._looked = float("-inf")  # time.monotonic() of the last whole look at the CMS
        self._ticks = 0
        self._verified: dict[tuple[str, str], str] = {}  # (host, sha256 of token) → hash
        self._packages: dict[str, tuple[bytes, bytes, Any]] = {}
        self._lock = threading.Lock()
        self._opening = asyncio.Lock()  # requests wait for a package's opening on the loop
        self._watcher: anyio.CapacityLimiter | None = None  # made on the loop, in watch()
        self.refused = 0
        self.closing = False  # the server is stopping: every long-poll answers at once

    # -- the CMS, watched ------------------------------------------------------------------
    def read(self, top: int, signature: tuple[Any, ...] | None, resync: bool) -> Changes:
        """One look at the CMS (in a worker thread): touches no shared state."""
        ch = Changes()
        for d in pullstate.desired_since(self.url, top):
            ch.generations[d.host] = d.generation
            ch.bodies[d.host] = d.to_dict()
        if resync:
            ch.full = pullstate.generations(self.url)
        sig = pullstate.agent_signature(self.url)
        # and at every resync: a token re-issued under a clock that stepped back leaves the
        # signature's max(issued_at) as it was, so a rotated token holds at most 10 s more
        if sig != signature or resync:
            ch.agents, ch.agent_signature = pullstate.agent_rows(self.url), sig
        return ch

    def apply(self, ch: Changes) -> set[str]:
        """Fold a look's findings in (on the event loop); the hosts whose answer changed."""
        moved: set[str] = set()
        if ch.full is not None:
            for host in set(ch.full) | set(self.generations):
                if ch.full.get(host, 0) != self.generations.get(host, 0):
                    moved.add(host)
                    self.bodies.pop(host, None)
            self.generations = dict(ch.full)
        for host, gen in ch.generations.items():
            if gen < self.generations.get(host, 0):
                continue  # the resync, read a moment later, saw a newer one: next tick's
            if gen != self.generations.get(host):
                moved.add(host)
            self.generations[host] = gen
            self.bodies[host] = ch.bodies[host]
        self.top = max([self.top, *ch.generations.values()])
        if ch.agents is not None:
            nudges = {h: a.nudge for h, a in ch.agents.items()}
            moved |= {
                h for h in set(nudges) | set(self.nudges)
                if nudges.get(h, 0) != self.nudges.get(h, 0)
            }  # fmt: skip
            self.nudges, self.agents = nudges, ch.agents
            self._agent_signature = ch.agent_signature
        return moved

    def poll(self) -> set[str]:
        """A whole look, synchronously (the server's start)."""
        started = time.monotonic()
        moved = self.apply(self.read(self.top, self._agent_signature, resync=True))
        self._looked = started
        return moved

    def close(self) -> None:
        """The server stops: every waiting long-poll answers now, and new ones at once."""
        self.closing = True
        self.wake(set(self.waiters))

    def wake(self, hosts: set[str]) -> None:
        for host in hosts:
            for fut in self.waiters.pop(host, ()):
                if not fut.done():
                    fut.set_result(None)

    async def _in_thread(self, fn: Any, *args: Any) -> Any:
        if self._watcher is None:
            self._watcher = anyio.CapacityLimiter(WATCHER_THREADS)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._watcher)

    async def watch(self) -> None:
        while True:
            self._ticks += 1
            beats, self.beats = self.beats, {}
            try:
                if beats:
                    await self._in_thread(pullstate.heartbeats, self.url, beats)
            except Exception as exc:  # noqa: BLE001 - the CMS may be busy: keep them
                log.warning("heartbeats not recorded yet: %s", exc)
                self.beats = {**beats, **self.beats}
            if self._ticks % BEAT_TICKS == 0 and self.waiters:
                try:  # a waiting long-poll on an open connection: its agent is alive
                    await self._in_thread(pullstate.seen, self.url, list(self.waiters), utcnow())
                except Exception as exc:  # noqa: BLE001 - the next stamp will do
                    log.warning("waiting hosts not stamped alive: %s", exc)
            try:
                started = time.monotonic()  # what the look reads is at least this recent
                ch = await self._in_thread(
                    self.read, self.top, self._agent_signature, self._ticks % RESYNC == 0
                )
                self.wake(self.apply(ch))
                self._looked = started
            except Exception as exc:  # noqa: BLE001 - the CMS may be busy: try next tick
                log.warning("desired state not read: %s", exc)
            await asyncio.sleep(TICK)

    async def wait(self, host: str, timeout: float, hangup: asyncio.Future[Any]) -> None:
        """Until the host's answer may have changed, `timeout`, or the client hangs up."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.waiters.setdefault(host, set()).add(fut)
        timer = loop.call_later(timeout, _settle, fut)
        settle = lambda _: _settle(fut)  # noqa: E731
        hangup.add_done_callback(settle)
        try:
            await fut
        finally:
            timer.cancel()
            hangup.remove_done_callback(settle)
            mine = self.waiters.get(host)
            if mine is not None:
                mine.discard(fut)
                if not mine:
                    del self.waiters[host]

    # -- tokens ----------------------------------------------------------------------------
    def authorize(self, request: Request, host: str) -> None:
        token = _bearer(request)
        if not token:
            raise Refused(401, "no token")
        parts = pullstate.split_token(token)
        if parts is None:
            raise Refused(401, "malformed token")
        if parts[0] != host:
            raise Refused(403, f"a token of host {parts[0]!r} asked for host {host!r}")
        row = pullstate.agent(self.url, host)  # one row: every request of 10,000 agents
        if row is None:
            raise Refused(401, "no agent installed for this host")
        if row.revoked:
            raise Refused(401, "token revoked")
        key = (host, hashlib.sha256(token.encode()).hexdigest())
        if self._verified.get(key) == row.digest:
            return  # scrypt once per token, not once per request
        if not pullstate.token_matches(token, host, row.salt, row.digest):
            raise Refused(401, "token does not match")
        self._verified[key] = row.digest

    def known(self, request: Request, host: str) -> bool:
        """Without the CMS: is this request's token the one this server verified for the host
        (scrypt once), and neither revoked nor re-issued as of its last look, taken within
        FRESH seconds? The look re-reads the agent rows whenever any is installed,
        re-issued, revoked or nudged, so a revocation holds within a tick (0.25 s), and
        10,000 agents' polls cost no row read each: it was half the server's CPU per poll.
        Only accepts: whatever is refused is refused from the CMS's own row, and logged."""
        if time.monotonic() - self._looked > FRESH:
            return False
        token = _bearer(request)
        if not token:
            return False
        key = (host, hashlib.sha256(token.encode()).hexdigest())
        row = self.agents.get(host)
        return row is not None and not row.revoked and self._verified.get(key) == row.digest

    # -- packages --------------------------------------------------------------------------
    async def opened(self, release_id: str) -> tuple[bytes, bytes, Any]:
        """`package`, from the event loop: one opening at a time, the rest wait on the loop
        (not in worker threads, which the CMS pool's size bounds)."""
        got = self._packages.get(release_id)
        if got is None:
            async with self._opening:
                got = await run_in_threadpool(self.package, release_id)
        return got

    def package(self, release_id: str) -> tuple[bytes, bytes, Any]:
        """(manifest, signature, object cache) of a release some host is pointed at."""
        with self._lock:
            got = self._packages.get(release_id)
            if got is not None:
                return got
            wanted = [
                d for d in pullstate.desired_all(self.url).values() if d.release_id == release_id
            ]
            if not wanted or wanted[0].release is None:
                raise Refused(404, f"no host is pointed at release {release_id}")
            from orchestrator.objects import ObjectCache

            pkg = self.dml.open(wanted[0].release)  # signature + every checksum
            if pkg.digest != wanted[0].digest:
                raise Refused(409, f"the DML's {wanted[0].release} is not {wanted[0].digest}")
            objects = ObjectCache(pkg, self.cache)
            objects.ensure()
            got = (pkg.manifest_bytes, self.dml.signature_for_hosts(pkg), objects)
            self._packages[release_id] = got
            return got


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _refuse(request: Request, host: str, exc: Refused) -> Response:
    state: ServerState = request.app.state.ferry
    state.refused += 1
    client = request.client.host if request.client else "?"
    # %r: a path is decoded (`%0A` is a newline) and could forge log lines otherwise
    log.warning(
        "refused %s %r for host %r from %s: %s",
        request.method, request.url.path, host, client, exc.reason,
    )  # fmt: skip
    return JSONResponse({"error": "refused", "reason": exc.reason}, status_code=exc.status)


def _gone(host: str) -> Response:
    """The agent hung up before its body arrived (its own timeout): one line, no traceback."""
    log.info("host %s disconnected before its request body arrived", host)
    return Response(status_code=400)


async def _authorized(
    request: Request, host: str | None = None, shown: str | None = None
) -> tuple[ServerState, str] | Response:
    """The request's token, checked for `host` (the path's host by default); a refusal is
    logged naming `shown`, the host by default."""
    state: ServerState = request.app.state.ferry
    host = request.path_params["host"] if host is None else host
    shown = host[:60] if shown is None else shown
    if not _NAME.match(host):
        return _refuse(request, shown, Refused(400, "bad host name"))
    if state.known(request, host):
        return state, host
    try:
        await run_in_threadpool(state.authorize, request, host)
    except Refused as exc:
        return _refuse(request, shown, exc)
    return state, host


async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


def _token_host(request: Request) -> str:
    """The host a request's token names ("" without a well-formed one: refused as such)."""
    parts = pullstate.split_token(_bearer(request))
    return parts[0] if parts else ""


def _bearer(request: Request) -> str:
    """The request's bearer token, or "" (no Authorization header, or not a bearer one)."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


async def _any_host(request: Request) -> Response | None:
    """None when the request carries a valid token of any installed host, else the refusal."""
    host = _token_host(request)
    if not host:
        why = "no token" if "authorization" not in request.headers else "malformed token"
        return _refuse(request, "-", Refused(401, why))
    # named in the log only when it is an installed host: a token pasted with a dot in its
    # secret would otherwise put part of the secret in the log as the "host"
    shown = host if host in request.app.state.ferry.agents else "-"
    got = await _authorized(request, host, shown)
    return got if isinstance(got, Response) else None


async def release_file(request: Request) -> Response:
    refused = await _any_host(request)
    if refused is not None:
        return refused
    state: ServerState = request.app.state.ferry
    rid, part = request.path_params["rid"], request.path_params["part"]
    if not _NAME.match(rid) or part not in ("manifest", "signature"):
        return JSONResponse({"error": "not found"}, status_code=404)
    try:
        manifest, signature, _ = await state.opened(rid)
    except Refused as exc:
        return JSONResponse({"error": exc.reason}, status_code=exc.status)
    body = manifest if part == "manifest" else signature
    return Response(body, media_type="application/octet-stream", headers=IMMUTABLE)


async def object_file(request: Request) -> Response:
    refused = await _any_host(request)
    if refused is not None:
        return refused
    state: ServerState = request.app.state.ferry
    sha = request.path_params["sha"]
    path = state.cache / "objects" / sha
    if not _SHA.match(sha) or not path.is_file():
        return JSONResponse({"error": "not found"}, status_code=404)
    return FileResponse(path, media_type="application/octet-stream", headers=IMMUTABLE)


def _beat(request: Request) -> dict[str, Any] | None:
    """What a long-poll's `X-Ferry-Beat` says (a heartbeat's fields), or None; ValueError
    if it is there but not a JSON object."""
    raw = request.headers.get("x-ferry-beat")
    if raw is None:
        return None
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError
    return _beat_fields(data)


def _beat_fields(data: dict[str, Any]) -> dict[str, Any]:
    """What the server keeps of a heartbeat, posted or carried by a long-poll."""
    return {k: data.get(k) for k in BEAT_KEYS}


async def _hangup(request: Request) -> None:
    """Returns when the client hangs up (a GET's body, empty, is read first)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def desired(request: Request) -> Response:
    loop = asyncio.get_running_loop()
    arrived = loop.time()  # the poll's length counts from here, authorization included
    got = await _authorized(request)
    if isinstance(got, Response):
        return got
    state, host = got
    try:
        after = int(request.query_params.get("after", "-1"))
        seen_nudge = int(request.query_params.get("nudge", "-1"))
        wait = min(float(request.query_params.get("wait", "25")), MAX_WAIT)
        beat = _beat(request)
    except ValueError:
        return JSONResponse(
            {"error": "after, nudge and wait are numbers; X-Ferry-Beat is a JSON object"},
            status_code=400,
        )
    if beat is not None:  # this long-poll is the host's heartbeat
        state.beats[host] = (utcnow(), beat)
    # "no change" comes a little before the poll's length, spread, so the client re-polls
    # before its own timeout and 10,000 agents that started together do not re-poll together
    deadline = arrived + max(0.0, wait) * random.uniform(0.8, 0.95)
    waited = False
    # a task per waiting long-poll (~1 KiB): the one way to hear its agent hang up at once
    hangup = asyncio.ensure_future(_hangup(request))
    try:
        while True:
            gen = state.generations.get(host, 0)
            nudge = state.nudges.get(host, 0)
            if gen > after or (seen_nudge >= 0 and nudge != seen_nudge):
                break
            left = deadline - loop.time()
            if left <= 0 or state.closing:
                return JSONResponse(
                    {"changed": False, "generation": gen, "nudge": nudge, "beat": beat is not None}
                )
            await state.wait(host, left, hangup)
            if hangup.done() and not hangup.cancelled() and hangup.exception() is None:
                return Response(status_code=499)  # nobody is there to read it
            waited = True
    finally:
        hangup.cancel()
    if waited and not state.known(request, host):
        # revoked or re-issued while its long-poll waited: the CMS says which, and it is logged
        again = await _authorized(request)
        if isinstance(again, Response):
            return again
    body: dict[str, Any] = {
        "changed": True,
        "nudge": state.nudges.get(host, 0),
        "beat": beat is not None,
    }
    known = state.bodies.get(host)
    if known is not None and known["generation"] == gen:
        body.update(known)
    else:  # a host that asks after a restart for a state set long ago: one row
        d = await run_in_threadpool(pullstate.desired, state.url, host)
        body.update(d.to_dict() if d else {"generation": 0, "release_id": None, "purpose": None})
    return JSONResponse(body)


async def report(request: Request) -> Response:
    got = await _authorized(request)
    if isinstance(got, Response):
        return got
    state, host = got
    try:
        body = await request.json()
        items = body if isinstance(body, list) else [body]
        for item in items:
            if item.get("host", host) != host:
                raise Refused(403, f"host {host} reported for host {item.get('host')!r}")
            int(item["generation"]), str(item["step"]), bool(item["ok"])
    except Refused as exc:
        return _refuse(request, host, exc)
    except ClientDisconnect:
        return _gone(host)  # the agent keeps the report and sends it again
    except (ValueError, KeyError, TypeError, AttributeError):
        return JSONResponse({"error": "a report is {generation, step, ok, …}"}, status_code=400)
    current = await run_in_threadpool(pullstate.desired, state.url, host)
    for item in items:
        if current is None or int(item["generation"]) > current.generation:
            return _refuse(
                request, host, Refused(403, f"report for generation {item['generation']} "
                                            "this host was never given")
            )  # fmt: skip
    for item in items:
        await run_in_threadpool(pullstate.add_report, state.url, host, item)
    return JSONResponse({"recorded": len(items)})


async def heartbeat(request: Request) -> Response:
    got = await _authorized(request)
    if isinstance(got, Response):
        return got
    state, host = got
    try:
        data = await request.json()
        if not isinstance(data, dict):
            raise ValueError
    except ClientDisconnect:
        return _gone(host)
    except ValueError:
        return JSONResponse({"error": "a heartbeat is a JSON object"}, status_code=400)
    keep = _beat_fields(data)
    state.beats[host] = (utcnow(), keep)  # recorded with the tick's others, one transaction
    return JSONResponse({"ok": True})


def make_app(cms_url: str, dml: Any, cache: Path) -> Starlette:
    state_box: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        # no more worker threads than the CMS pool has connections (5 + 10 overflow): when
        # 10,000 agents first connect at once, their token checks queue here instead of
        # timing out after 30 s waiting for a connection (three 500s in the idle benchmark)
        anyio.to_thread.current_default_thread_limiter().total_tokens = REQUEST_THREADS
        state = ServerState(cms_url, dml, cache)
        await run_in_threadpool(state.poll)
        app.state.ferry = state
        task = asyncio.create_task(state.watch())
        state_box["state"] = state
        try:
            yield
        finally:
            task.cancel()
            # the heartbeats answered since the last tick: a stop loses none. The watcher
            # first: a write it had begun finishes in its thread (an older beat committed
            # after a newer one would win), and a failed one puts its beats back
            with contextlib.suppress(asyncio.CancelledError):
                await task
            beats, state.beats = state.beats, {}
            try:
                await asyncio.wait_for(
                    run_in_threadpool(pullstate.heartbeats, state.url, beats), STOP_WRITE
                )
            except Exception as exc:  # noqa: BLE001 - stopping anyway: say so, do not hang
                log.warning("%d heartbeats not recorded at the stop: %s", len(beats), exc)

    routes = [
        Route("/v1/health", health),
        Route("/v1/releases/{rid}/{part}", release_file),
        Route("/v1/objects/{sha}", object_file),
        Route("/v1/hosts/{host}/desired", desired),
        Route("/v1/hosts/{host}/reports", report, methods=["POST"]),
        Route("/v1/hosts/{host}/heartbeat", heartbeat, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)
