"""What the pull method refuses, and logs, with nothing run (issue 12): a tampered object,
a wrong signature, a forged, revoked or other host's token, a swapped server certificate.
And what it survives: the server killed and restarted mid-wave, the server stopped and
restarted mid-download, a host's own apply time."""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
import time
import urllib.error
import urllib.request

from dml.store import DML
from orchestrator.dmlserver import tls
from orchestrator.objects import ObjectCache
from tests.deploy.helpers import build, deploy, files_match, host_release, rfc, rid, shared_file
from tests.pull.test_pull_deploy import agent_status, install, pull_plan, wait_for


def call(server, path: str, token: str | None, body=None) -> tuple[int, dict]:  # type: ignore[no-untyped-def]
    req = urllib.request.Request(
        server.url + path,
        data=None if body is None else json.dumps(body).encode(),
        method="GET" if body is None else "POST",
        headers={"Content-Type": "application/json"},
    )
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    ctx = ssl.create_default_context(cafile=str(server.ca))
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def token_of(fleet, host: str) -> str:  # type: ignore[no-untyped-def]
    return (fleet.root_dir(host) / ".ferry" / "pull" / "token").read_text().strip()


def test_tokens_see_and_report_only_their_own_host_and_refusals_are_logged_without_them(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    p = pull_plan(ferry_home, fleet, dml_server, targets=["h1", "h2"], strategy="big-bang",
                  waves=None)  # fmt: skip
    install(run_ferry, p)
    t1, t2 = token_of(fleet, "h1"), token_of(fleet, "h2")
    assert t1 != t2 and t1.startswith("h1.")
    assert call(dml_server, "/v1/hosts/h1/desired?wait=0", t1)[0] == 200
    # another host's state, asked for or reported
    assert call(dml_server, "/v1/hosts/h2/desired?wait=0", t1)[0] == 403
    report = {"generation": 0, "step": "done", "ok": True}
    assert call(dml_server, "/v1/hosts/h2/reports", t1, report)[0] == 403
    assert call(dml_server, "/v1/hosts/h1/reports", t1, {**report, "host": "h2"})[0] == 403
    # forged: the right shape, not the issued secret; and no token at all
    assert call(dml_server, "/v1/hosts/h1/desired?wait=0", "h1." + "A" * 43)[0] == 401
    assert call(dml_server, "/v1/hosts/h1/heartbeat", None, {})[0] == 401
    # revoked
    assert run_ferry("agent", "revoke", "h2").returncode == 0
    # the server accepts a known token from its last look at the agent rows, which it takes
    # again at its next tick (0.25 s) after a revocation: refused within a few ticks, even on
    # a loaded machine (CI: a tick late)
    deadline, refused_after = time.monotonic() + 2.0, None
    while refused_after is None and time.monotonic() < deadline:
        if call(dml_server, "/v1/hosts/h2/desired?wait=0", t2)[0] == 401:
            refused_after = 2.0 - (deadline - time.monotonic())
        else:
            time.sleep(0.05)
    assert refused_after is not None, "a revoked token still accepted 2 s after `agent revoke`"
    assert call(dml_server, "/v1/hosts/h2/heartbeat", t2, {"current": None})[0] == 401
    assert run_ferry("agent", "nudge", "h1").returncode == 0
    assert run_ferry("agent", "nudge", "h2").returncode == 2  # revoked: no active agent
    unknown = run_ferry("agent", "revoke", "h9")
    assert unknown.returncode == 2 and "h9" in unknown.stderr, unknown.stderr  # one line, no trace
    assert "Traceback" not in unknown.stderr
    log = (ferry_home / ".ferry" / "logs" / "dmlserver.log").read_text()
    assert log.count("refused") >= 7, log
    assert "token revoked" in log and "token does not match" in log
    for secret in (t1, t2, t1.split(".", 1)[1], t2.split(".", 1)[1]):
        assert secret not in log
    # the CMS keeps a salted scrypt hash, never the token
    from sqlalchemy import select

    from orchestrator.cms.db import session_scope
    from orchestrator.cms.models import PullAgent

    with session_scope() as s:
        rows = {r.host: r for r in s.scalars(select(PullAgent))}
    assert t1.split(".", 1)[1] not in json.dumps(
        {k: [v.token_hash, v.token_salt] for k, v in rows.items()}
    )


def test_a_tampered_object_and_a_wrong_signature_are_refused_before_anything_runs(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    p = pull_plan(ferry_home, fleet, dml_server, targets=["h1", "h2"], strategy="big-bang",
                  waves=None)  # fmt: skip
    install(run_ferry, p)
    # h1: the server's copy of one object is altered (its cache is what it serves)
    pkg = DML.from_settings().open("shop@1.0")
    cache = ObjectCache(pkg, ferry_home / ".ferry" / "dmlserver")
    cache.ensure()
    victim = next(f for f in pkg.files if f.path.endswith("VERSION"))
    (cache.dir / victim.sha256).write_bytes(b"9.9\n")
    # h2: pins a DML key that did not sign the release
    (fleet.root_dir("h2") / ".ferry" / "dml.pub").write_text("11" * 32 + "\n")
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 6, res.stdout + res.stderr  # integrity-failed, as for push
    hosts = res.json()["hosts"]
    assert "corrupted" in hosts["h1"]["failure"]["reason"], hosts["h1"]
    assert "signature" in hosts["h2"]["failure"]["reason"], hosts["h2"]
    for h in ("h1", "h2"):
        assert host_release(fleet, h) is None
        assert shared_file(fleet, h, "data/schema") is None  # no hook ran
        assert not (fleet.root_dir(h) / "releases" / rid("shop@1.0")).exists()
    # objects are static and content-addressed: range requests for resumable downloads
    other = next(f for f in pkg.files if f.sha256 != victim.sha256 and f.size > 2)
    req = urllib.request.Request(
        f"{dml_server.url}/v1/objects/{other.sha256}",
        headers={"Range": "bytes=0-1", "Authorization": f"Bearer {token_of(fleet, 'h1')}"},
    )
    ctx = ssl.create_default_context(cafile=str(dml_server.ca))
    with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
        assert r.status == 206 and len(r.read()) == 2
        assert "immutable" in r.headers["Cache-Control"]


def test_a_swapped_server_certificate_is_refused_by_the_agent(
    pull_fleet, dml_server, run_ferry, ferry_home, tmp_path
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    p = pull_plan(ferry_home, fleet, dml_server, targets=["h1"], strategy="big-bang", waves=None)
    install(run_ferry, p)
    wait_for(lambda: agent_status(run_ferry)["h1"]["last_heartbeat"], 30, "h1's heartbeat")
    dml_server.stop()
    # another CA's certificate for the same address, at the same place
    other = tmp_path / "other-home"
    cert, key = tls.server_certificate(other, [dml_server.listen.split(":")[0]])
    pki = ferry_home / ".ferry" / "pki"
    saved = {n: (pki / n).read_bytes() for n in ("ca.pem", "ca.key")}
    for n in ("ca.pem", "ca.key"):
        (pki / n).write_bytes((other / "pki" / n).read_bytes())
    log = fleet.root_dir("h1") / ".ferry" / "pull" / "agent.log"
    before = log.read_text()
    try:
        _start_with(dml_server)
        wait_for(
            lambda: "CERTIFICATE_VERIFY_FAILED" in log.read_text()[len(before):], 60,
            "h1's agent to refuse the certificate",
        )  # fmt: skip
    finally:
        dml_server.stop()
        for n, data in saved.items():
            (pki / n).write_bytes(data)
    dml_server.start()
    assert host_release(fleet, "h1") is None


def _start_with(server) -> None:  # type: ignore[no-untyped-def]
    """Start the server with whatever CA the home holds now; wait until it listens."""
    import socket
    import subprocess

    from tests.conftest import FERRY_BIN

    with open(server.log, "ab") as out:
        server.proc = subprocess.Popen(
            [str(FERRY_BIN), "dml", "serve", "--listen", server.listen],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    addr, port = server.listen.split(":")
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection((addr, int(port)), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_the_server_killed_and_restarted_mid_wave_loses_nothing(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    hooks = {"install": "sleep 10 && mkdir -p {{ shared }}/data && echo ok > {{ shared }}/data/i"}
    p = pull_plan(ferry_home, fleet, dml_server, targets=["h1", "h2", "h3"], strategy="big-bang",
                  waves=None, hooks=hooks)  # fmt: skip
    install(run_ferry, p)
    result = {}

    def run() -> None:
        result["res"] = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))

    t = threading.Thread(target=run)
    t.start()
    # mid-wave: every host's agent has started the install hook
    from orchestrator import pullstate
    from orchestrator.settings import get_settings

    def steps() -> dict[str, set[str]]:
        got: dict[str, set[str]] = {"h1": set(), "h2": set(), "h3": set()}
        for r in pullstate.reports(get_settings().cms_url, list(got)):
            got[r.host].add(r.step)
        return got

    wait_for(lambda: all("verify" in s for s in steps().values()), 180, "the wave under way")
    assert not any("install" in s for s in steps().values())  # the install hooks still run
    dml_server.stop(signal.SIGKILL)
    time.sleep(12)  # the hooks finish while the server is away: their reports wait
    assert not any("install" in s for s in steps().values())
    dml_server.start()
    t.join(timeout=300)
    res = result["res"]
    assert res.returncode == 0, res.stdout + res.stderr
    for h in ("h1", "h2", "h3"):
        assert host_release(fleet, h) == rid("shop@1.0")
    assert os.path.exists(fleet.root_dir("h1") / "shared" / "data" / "i")


def test_a_server_stopped_mid_download_and_restarted_is_fetched_from_again(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    """SIGTERM to `ferry dml serve` while a host's agent fetches a release over a slow link:
    the server exits within its grace, the agent's next fetches are refused, it tries again
    until the restarted server answers, and the deployment succeeds without a backout."""
    fleet = pull_fleet
    objects = {f"data/{i:02d}.bin": os.urandom(100_000) for i in range(40)}  # 4 MB, 40 objects
    build(ferry_home, "1.0", extra=objects)
    p = pull_plan(ferry_home, fleet, dml_server, targets=["h1"], strategy="big-bang",
                  waves=None)  # fmt: skip
    install(run_ferry, p)
    incoming = fleet.root_dir("h1") / ".ferry" / "incoming"

    def arrived() -> int:  # objects fetched whole (a sha256 name; not a .part, not the manifest)
        return sum(1 for f in incoming.glob("*") if len(f.name) == 64)

    result = {}

    def run() -> None:
        result["res"] = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))

    with fleet.faulted("h1", "slow", rate="4mbit"):  # ~0.2 s an object: ~8 s for all of them
        t = threading.Thread(target=run)
        t.start()
        wait_for(lambda: arrived() >= 3, 120, "the download under way")
        assert dml_server.proc is not None
        stopped = time.monotonic()
        dml_server.stop(signal.SIGTERM)
        took = time.monotonic() - stopped
        assert arrived() < 40, "the download finished before the stop: nothing was tested"
        dml_server.start()
        t.join(timeout=300)
    assert took < 15, f"the server took {took:.1f} s to stop"
    res = result["res"]
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.json()["status"] == "succeeded", res.json()
    assert host_release(fleet, "h1") == rid("shop@1.0")
    assert files_match(fleet, "h1", "shop@1.0")
    log = (fleet.root_dir("h1") / ".ferry" / "pull" / "agent.log").read_text()
    assert "trying again" in log, log[-2000:]


def test_apply_boot_hosts_are_pending_until_their_agent_restarts(
    pull_fleet, dml_server, run_ferry, ferry_home
):
    fleet = pull_fleet
    build(ferry_home, "1.0")
    p = pull_plan(ferry_home, fleet, dml_server, targets=["h1", "h2"], strategy="big-bang",
                  waves=None, pull={"server": dml_server.url, "poll": "5s", "heartbeat": "2s",
                                    "apply": "boot"})  # fmt: skip
    install(run_ferry, p)
    wait_for(
        lambda: all(agent_status(run_ferry)[h]["last_heartbeat"] for h in ("h1", "h2")), 30,
        "the agents' heartbeats",
    )  # fmt: skip
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    from orchestrator.cms import deployments
    from orchestrator.settings import get_settings

    rec = deployments.load(get_settings().cms_url, res.json()["id"])
    assert {e["host"] for e in rec.evidence["pending"]} == {"h1", "h2"}
    assert rec.latest("outcomes") == {}  # pending hosts are not counted by the milestone
    target = rid("shop@1.0")
    time.sleep(3)
    assert host_release(fleet, "h1") is None and host_release(fleet, "h2") is None
    wait_for(lambda: agent_status(run_ferry)["h1"]["pending"] == target, 30, "h1 pending")
    status = run_ferry("status", "-o", "json")
    assert status.returncode == 0 and "hosts" in status.json()
    assert target not in json.dumps(status.json()["hosts"])  # never shown as deployed
    assert [(p["host"], p["release_id"]) for p in status.json()["pending"]] == [
        ("h1", target), ("h2", target),
    ]  # fmt: skip
    # h1's agent restarts (its supervisor starts it again): now it applies
    pid = int((fleet.root_dir("h1") / ".ferry" / "pull" / "agent.pid").read_text())
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: host_release(fleet, "h1") == target, 60, "h1 to apply at its restart")
    time.sleep(3)
    assert host_release(fleet, "h2") is None
    assert agent_status(run_ferry)["h2"]["pending"] == target
    wait_for(
        lambda: [p["host"] for p in run_ferry("status", "-o", "json").json()["pending"]]
        == ["h2"],
        30, "ferry status to show only h2 pending",
    )  # fmt: skip
    # a person on h2 applies at once with the agent's local command
    agent = f"{fleet.deploy_root('h2')}/.ferry/pull/ferry_agent.py"
    done = fleet.ssh("h2", f"python3 {agent} apply-now --root {fleet.deploy_root('h2')}")
    assert done.returncode == 0, done.stderr
    wait_for(lambda: host_release(fleet, "h2") == target, 60, "h2 to apply at once")
