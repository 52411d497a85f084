"""The pull method's pure parts (issue 12): plan settings, the steps an agent is given,
tokens, and the agent's own window rule. The fleet tests are in tests/pull/."""

from __future__ import annotations

import calendar
import hashlib
import textwrap
from pathlib import Path

import pytest

from orchestrator.agent import ferry_agent
from orchestrator.backout import BackoutAction
from orchestrator.errors import ExitCode, SpecError
from orchestrator.plan import Milestone, Timeouts, load_plan
from orchestrator.pull import backout_spec, forward_spec
from orchestrator.pullstate import hash_secret, split_token, token_matches
from orchestrator.rollout import Baseline, HostAction, RenderedCheck, Rollout, StepCommand, WavePlan

PLAN = "environment: dev\nstrategy: big-bang\n"


def refused(path: Path, text: str) -> str:
    path.write_text(textwrap.dedent(text))
    with pytest.raises(SpecError) as caught:
        load_plan(path)
    assert caught.value.exit_code == ExitCode.BAD_INPUT
    assert "\n" not in caught.value.message and str(path) in caught.value.message
    return caught.value.message


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("method: pull\n", "method pull needs pull: {server"),
        ("pull: {server: 'https://198.18.0.1:8443'}\n", "pull: settings need method: pull"),
        ("method: pull\npull: {server: 'ftp://x'}\n", "the DML server is https://"),
        ("method: pull\npull: {server: 'https://a:1', apply: later}\n", "pull.apply"),
        (
            "method: pull\npull: {server: 'https://a:1', heartbeat: 1s}\n",
            "heartbeat is at least 2s",
        ),
        (
            "method: pull\npull: {server: 'https://a:1', apply: window, "
            "window: {start: '25:00', end: '03:00'}}\n",
            "a window time is HH:MM",
        ),
    ],
)
def test_bad_pull_settings_are_exit_2_naming_the_field(tmp_path: Path, extra: str, says: str):
    assert says in refused(tmp_path / "plan.yaml", PLAN + extra)


def test_good_pull_settings_load(tmp_path: Path) -> None:
    (tmp_path / "plan.yaml").write_text(
        PLAN + "method: pull\npull: {server: 'https://198.18.0.1:8443/', poll: 10s, apply: boot}\n"
    )
    plan = load_plan(tmp_path / "plan.yaml")
    assert plan.pull is not None
    assert (plan.pull.server, plan.pull.poll, plan.pull.apply) == (
        "https://198.18.0.1:8443", 10.0, "boot",
    )  # fmt: skip


CHECK = RenderedCheck("health", "http", "http://127.0.0.1/health")


def rollout(action: HostAction) -> Rollout:
    return Rollout(
        release="shop@2.0", digest="sha256:" + "b" * 64, release_id="shop-2.0-bbbbbbbbbbbb",
        environment="dev", strategy="big-bang", method="pull", concurrency=5,
        waves=(WavePlan(1, (action,)),), milestone=Milestone(), timeouts=Timeouts(step=30),
        pull={"server": "https://a:1", "apply": "now"},
    )  # fmt: skip


ACTION = HostAction(
    host="h1", address="198.18.0.2", port=22, deploy_root="/srv/app",
    steps=("stage", "verify", "install", "activate", "check"),
    prior=Baseline("shop@1.0", "sha256:" + "a" * 64),
    forward={
        "install": StepCommand("make install", (("app.conf", "x=1\n"),)),
        "activate": StepCommand("systemctl reload shop"),
        "check": StepCommand("./health"),
    },
    backout={
        "reactivate": StepCommand("systemctl reload shop"),
        "recheck": StepCommand("./health", checks=(CHECK,)),
    },
    checks=(CHECK,),
    context={"release_path": "/srv/app/releases/shop-2.0-bbbbbbbbbbbb", "version": "2.0"},
    backout_context={"release_path": "/srv/app/releases/shop-1.0-aaaaaaaaaaaa"},
)  # fmt: skip


def test_the_agent_is_given_the_planners_steps_in_order_then_the_milestone_checks() -> None:
    spec = forward_spec(rollout(ACTION), ACTION)
    assert [a["step"] for a in spec["actions"]] == [*ACTION.steps, "milestone"]
    by = {a["step"]: a for a in spec["actions"]}
    assert by["install"] == {
        "step": "install",
        "run": "make install",
        "config": {"app.conf": "x=1\n"},
    }
    assert by["activate"]["switch"] == "shop-2.0-bbbbbbbbbbbb"
    assert "run" not in by["stage"] and "switch" not in by["check"]
    assert by["milestone"]["checks"][0]["target"] == "http://127.0.0.1/health"
    assert spec["env"]["FERRY_VERSION"] == "2.0"
    assert spec["cwd"] == ACTION.context["release_path"] and spec["timeout"] == 30


def test_backout_points_the_agent_at_its_prior_and_only_revert_may_stop_it() -> None:
    b = BackoutAction("h1", ACTION.prior, ("revert", "reactivate", "recheck"))
    spec = backout_spec(rollout(ACTION), ACTION, b)
    steps = [a["step"] for a in spec["actions"]]
    assert steps == ["stage", "verify", "revert", "reactivate", "recheck"]
    by = {a["step"]: a for a in spec["actions"]}
    assert by["revert"] == {"step": "revert", "switch": "shop-1.0-aaaaaaaaaaaa"}
    assert by["reactivate"]["warn_only"] and by["recheck"]["warn_only"]
    assert by["recheck"]["checks"][0]["label"] == "health"
    assert spec["leaving"] == "shop-2.0-bbbbbbbbbbbb"  # the agent remembers it was backed out
    # no prior: back to nothing, nothing to stage
    none = backout_spec(rollout(ACTION), ACTION, BackoutAction("h1", None, ("revert",)))
    assert none["actions"] == [{"step": "revert", "switch": None}]


def test_a_token_answers_only_for_its_own_host() -> None:
    salt = "00" * 16
    digest = hash_secret("s3cret", salt)
    assert token_matches("h1.s3cret", "h1", salt, digest)
    assert not token_matches("h2.s3cret", "h1", salt, digest)
    assert not token_matches("h1.s3cret2", "h1", salt, digest)
    assert not token_matches("s3cret", "h1", salt, digest)
    assert split_token("web.1.abc") == ("web.1", "abc")
    assert digest != hash_secret("s3cret", "11" * 16)  # salted
    assert digest.startswith("scrypt:2048:8:1:")  # its parameters travel with it
    older = hash_secret("s3cret", salt, {"n": 2**14, "r": 8, "p": 1})
    assert token_matches("h1.s3cret", "h1", salt, older)
    assert not token_matches("h1.s3cret", "h1", salt, "not-a-hash")


@pytest.mark.parametrize(
    ("start", "end", "hhmm", "inside"),
    [
        ("02:00", "04:00", (3, 0), True),
        ("02:00", "04:00", (4, 0), False),
        ("02:00", "04:00", (1, 59), False),
        ("22:00", "02:00", (23, 30), True),  # past midnight
        ("22:00", "02:00", (1, 0), True),
        ("22:00", "02:00", (12, 0), False),
    ],
)
def test_the_agents_window_rule(start: str, end: str, hhmm: tuple[int, int], inside: bool):
    now = calendar.timegm((2026, 1, 1, hhmm[0], hhmm[1], 0, 3, 1, 0))
    assert ferry_agent.in_window({"start": start, "end": end}, now) is inside
    assert ferry_agent.in_window(None, now) is False


@pytest.mark.parametrize("code", [401, 503])
def test_a_refused_or_failed_answer_is_closed_before_the_agent_sleeps_on_it(
    tmp_path: Path, code: int
) -> None:
    """The agent holds the error through its back-off (up to 36 s): an answer left unread
    kept the server's side of the connection open that long (its TLS close waits on us)."""
    import json
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    eof = threading.Event()

    def answer_and_wait_for_eof() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.recv(65536)
            conn.sendall(
                f"HTTP/1.1 {code} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}".encode()
            )
            try:
                while conn.recv(65536):
                    pass
                eof.set()  # the agent closed its end
            except OSError:
                pass

    server = threading.Thread(target=answer_and_wait_for_eof, daemon=True)
    server.start()
    pull = tmp_path / ".ferry" / "pull"
    pull.mkdir(parents=True)
    config = {"server": f"http://127.0.0.1:{port}", "host": "h1", "insecure_http": True}
    (pull / "config.json").write_text(json.dumps(config))
    (pull / "token").write_text("h1.secret")
    agent = ferry_agent.PullAgent(str(tmp_path))
    try:
        with pytest.raises(Exception) as caught:
            agent.call("GET", "/v1/hosts/h1/desired?wait=0", timeout=5)
        held = caught.value  # as the agent's loop holds it while it backs off
        assert isinstance(held, ferry_agent.Refused) == (code == 401)
        assert eof.wait(5), "the agent kept the answered connection open"
    finally:
        listener.close()
        server.join(timeout=15)


class _DML:
    """A DML server stand-in over plain HTTP on 127.0.0.1 (the agent's `insecure_http`),
    serving one release; `cut[path]` answers that many requests with half the body and
    then closes (a server stopped mid-transfer), `short` paths with a whole body half as
    long as the manifest says, `status[path]` with that code."""

    def __init__(self, files: dict[str, bytes], raw: bytes, sig: bytes) -> None:
        import http.server
        import threading

        self.cut: dict[str, int] = {}
        self.short: set[str] = set()  # a whole body, half as long as the manifest says
        self.status: dict[str, int] = {}
        self.asked: list[str] = []
        bodies = {f"/v1/releases/r1/{k}": v for k, v in (("manifest", raw), ("signature", sig))}
        bodies |= {f"/v1/objects/{hashlib.sha256(d).hexdigest()}": d for d in files.values()}
        dml = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                dml.asked.append(self.path)
                body = bodies.get(self.path)
                if body is not None and self.path in dml.short:
                    body = body[: len(body) // 2]
                code = dml.status.get(self.path, 200 if body is not None else 404)
                self.send_response(code)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                if code != 200 or body is None:
                    return
                if dml.cut.get(self.path, 0) > 0:
                    dml.cut[self.path] -= 1
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def pull_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A host root with the DML key pinned, its pull agent configured for a local server."""
    import json

    from tests.unit.test_agent import PUB, package, run

    files = {"u/a.bin": b"a" * 300_000, "u/b.bin": b"b" * 200_000}
    raw, sig, _ = package(files)
    dml = _DML(files, raw, sig)
    assert run(tmp_path, "pin", "--key", PUB.hex())[0] == 0
    pull = tmp_path / ".ferry" / "pull"
    pull.mkdir(parents=True)
    config = {"server": dml.url, "host": "h1", "insecure_http": True}
    (pull / "config.json").write_text(json.dumps(config))
    (pull / "token").write_text("h1.secret")
    agent = ferry_agent.PullAgent(str(tmp_path))
    waited: list[float] = []
    monkeypatch.setattr(ferry_agent.time, "sleep", waited.append)  # the back-off, not slept
    try:
        yield agent, dml, files, json.loads(raw)["digest"]
    finally:
        dml.close()


def test_a_transfer_cut_short_is_fetched_again_and_checked(pull_host) -> None:  # type: ignore[no-untyped-def]
    agent, dml, files, digest = pull_host
    obj = f"/v1/objects/{hashlib.sha256(files['u/a.bin']).hexdigest()}"
    dml.cut = {obj: 1, "/v1/releases/r1/manifest": 1}  # the server stopped mid-transfer
    got = agent.stage("r1", digest)
    assert got == {"needed": 2, "bytes": 500_000}
    assert dml.asked.count(obj) == 2 and dml.asked.count("/v1/releases/r1/manifest") == 2
    incoming = Path(agent.host.incoming)
    for data in files.values():
        assert (incoming / hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert not list(incoming.glob("*.part"))


def test_a_transfer_that_keeps_failing_fails_the_step_and_a_refusal_is_not_retried(
    pull_host, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    agent, dml, files, digest = pull_host
    monkeypatch.setattr(ferry_agent, "FETCH_TRIES", 2)
    obj = f"/v1/objects/{hashlib.sha256(files['u/b.bin']).hexdigest()}"
    dml.cut = {obj: 99}
    with pytest.raises(ferry_agent.AgentError) as caught:
        agent.stage("r1", digest)
    assert caught.value.kind == "fetch" and "gave up after 2 attempt(s)" in caught.value.message
    assert "IncompleteRead" in caught.value.message and dml.asked.count(obj) == 2
    assert not list(Path(agent.host.incoming).glob("*.part"))
    # no retry starts past the window (a stalled server: each try may wait its timeout)
    monkeypatch.setattr(ferry_agent, "FETCH_TRIES", 6)
    monkeypatch.setattr(ferry_agent, "FETCH_WINDOW", 0.0)
    dml.asked.clear()
    with pytest.raises(ferry_agent.AgentError) as caught:
        agent.stage("r1", digest)
    assert "gave up after 1 attempt(s)" in caught.value.message and dml.asked.count(obj) == 1
    # a whole body of the wrong size is corrupted, not cut: not asked again
    dml.cut, dml.short = {}, {obj}
    dml.asked.clear()
    with pytest.raises(ferry_agent.AgentError) as caught:
        agent.stage("r1", digest)
    assert caught.value.kind == "integrity" and "arrived corrupted" in caught.value.message
    assert dml.asked.count(obj) == 1
    dml.short = set()
    dml.asked.clear()
    dml.status = {"/v1/releases/r1/manifest": 404}  # not on the server: asking again won't help
    with pytest.raises(ferry_agent.AgentError) as caught:
        agent.stage("r1", digest)
    assert "answered 404" in caught.value.message and dml.asked == ["/v1/releases/r1/manifest"]


def test_a_step_failing_in_a_way_not_foreseen_is_still_reported(pull_host) -> None:  # type: ignore[no-untyped-def]
    agent, dml, _, digest = pull_host
    dml.status = {"/v1/releases/r1/manifest": 401}  # Refused: neither AgentError nor OSError
    d = {"generation": 1, "deployment": 7, "release_id": "r1", "digest": digest,
         "purpose": "deploy", "spec": {"actions": [{"step": "stage"}]}}  # fmt: skip
    agent.apply(d)  # returns: the failure is reported (kept: this server takes no reports)
    (report,) = agent.st["outbox"]
    assert report["step"] == "stage" and report["ok"] is False
    assert report["detail"]["kind"] == "error" and "Refused" in report["detail"]["error"]


def _errors() -> list[tuple[BaseException, bool]]:
    import errno
    import http.client
    import socket
    import ssl
    import urllib.error

    return [
        (urllib.error.URLError(ConnectionRefusedError(111, "refused")), True),  # restarting
        (http.client.IncompleteRead(b"", 10), True),  # cut mid-body
        (http.client.RemoteDisconnected("closed"), True),
        (ConnectionResetError(104, "reset"), True),
        (TimeoutError("timed out"), True),
        (urllib.error.URLError(TimeoutError("timed out")), True),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), True),
        (urllib.error.URLError(ssl.SSLCertVerificationError(1, "bad cert")), False),
        (urllib.error.URLError("unknown url type: ftp"), False),
        (OSError(errno.EHOSTUNREACH, "No route to host"), True),  # the network, for now
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), True),
        (urllib.error.URLError(socket.gaierror(socket.EAI_NONAME, "Name unknown")), False),
        (OSError(errno.ENOSPC, "No space left on device"), False),  # the host's own disk
        (FileNotFoundError(2, "no such file"), False),
        (ValueError("x"), False),
    ]


@pytest.mark.parametrize(("exc", "passing"), _errors())
def test_only_a_failure_of_the_connection_itself_is_fetched_again(
    exc: BaseException, passing: bool
) -> None:
    assert ferry_agent._passing(exc) is passing
