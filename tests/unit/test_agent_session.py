"""The orchestrator's side of an agent session (orchestrator/transport/session.py) with the
real agent and the real OpenSSH pipe code, the agent started locally instead of through
ssh: what it makes of an agent that waits for another agent, or refuses mid-transfer."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrator.agent import ferry_agent
from orchestrator.errors import StepFailed
from orchestrator.transport import openssh, session
from tests.unit.test_agent import KEY, PUB, package


@pytest.fixture
def local(monkeypatch, tmp_path):
    """An AgentSession whose "ssh" runs the login's command here (sh -c)."""
    if not openssh.available():
        pytest.fail("the OpenSSH client is part of Ferry's set-up (make bootstrap)")
    monkeypatch.setattr(openssh, "argv", lambda _h, _s, _t, command: ["sh", "-c", command])
    host = SimpleNamespace(name="h1")
    ssh = SimpleNamespace(bulk="openssh", become=False, user="root")
    s = session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]
    yield s
    s.close()


def test_the_agents_lock_wait_is_the_one_the_orchestrator_allows_for():
    assert session.AGENT_LOCK_WAIT == ferry_agent.LOCK_WAIT


def test_a_step_that_waits_for_another_agent_moves_its_deadline(local, tmp_path):
    other = ferry_agent.Host(str(tmp_path))
    other.hold("the pull agent's deploy of app-2 (deployment 7)")
    threading.Timer(1.5, other.let_go).start()
    started = time.monotonic()
    res = local.request("stage", "pin", {"key": PUB.hex()}, timeout=0.5)  # a short step
    assert res["pinned"] == "new" and time.monotonic() - started >= 1.4
    assert (tmp_path / ".ferry/dml.pub").exists()


def test_an_agent_that_refuses_in_the_middle_of_a_transfer_is_heard(local, tmp_path):
    small, large = b"s" * 1024, os.urandom(16 << 20)  # far more than the pipes hold
    raw, sig, _ = package({"u/small": small, "u/large": large})
    local.request("stage", "pin", {"key": PUB.hex()}, timeout=10)
    frames = tmp_path.parent / "frames"
    with open(frames, "wb") as f:  # the small object arrives corrupted, the large after it
        f.write(f"{hashlib.sha256(small).hexdigest()} {len(small)}\n".encode() + b"x" * 1024)
        f.write(f"{hashlib.sha256(large).hexdigest()} {len(large)}\n".encode() + large)
        f.write(b"END\n")
    with pytest.raises(StepFailed) as refused:
        local.receive("app-1", raw, sig, lambda _need: Path(frames), timeout=30)
    assert refused.value.kind == "integrity", refused.value.message
    assert "arrived corrupted" in refused.value.message
    assert not (tmp_path / ".ferry/incoming" / hashlib.sha256(large).hexdigest()).exists()


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """An AgentSession whose "agent" is `script` (Python), run here: a host that misbehaves."""

    def make(script: str) -> session.AgentSession:
        path = tmp_path / "fake_agent.py"
        drain = "import sys, threading\nthreading.Thread(target=sys.stdin.buffer.read).start()\n"
        path.write_text(drain + script)  # it reads what it is sent, and answers `script`'s way
        argv = ["python3", "-I", str(path)]
        monkeypatch.setattr(openssh, "argv", lambda _h, _s, _t, _command: argv)
        host, ssh = SimpleNamespace(name="h1"), SimpleNamespace(bulk="openssh", become=False)
        return session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]

    return make


def test_a_host_cannot_hold_a_step_open_by_saying_wait_again_and_again(fake):
    s = fake("import time\nwhile True:\n    print('WAIT 1', flush=True)\n    time.sleep(0.3)\n")
    started = time.monotonic()
    try:
        with pytest.raises(session.StepTimeout):
            s.request("stage", "pin", {"key": PUB.hex()}, timeout=0.5)
        # the step's 0.5 s and one WAIT's 1 s, then up to 7 s to hear why and hang up; never more
        assert time.monotonic() - started < 12
    finally:
        s.close()


def test_a_garbled_wait_line_fails_the_host_not_the_deployment(fake):
    s = fake("import time\nprint('WAIT soon', flush=True)\ntime.sleep(30)\n")
    try:
        with pytest.raises(StepFailed, match="unexpected answer b'WAIT soon'"):
            s.request("stage", "pin", {"key": PUB.hex()}, timeout=10)
    finally:
        s.close()


def test_a_transfer_this_side_cannot_read_is_said_so(local, tmp_path):
    raw, sig, _ = package({"u/a": b"alpha"})
    local.request("stage", "pin", {"key": PUB.hex()}, timeout=10)
    gone = tmp_path.parent / "frames-gone"
    with pytest.raises(StepFailed, match=r"transfer failed \(\[Errno 2\] No such file"):
        local.receive("app-1", raw, sig, lambda _need: gone, timeout=30)


def test_a_busy_host_that_never_reads_a_large_manifest_is_still_heard(local, tmp_path, monkeypatch):
    """The agent takes the lock before it reads the manifest; refusing, it answers and ends
    with the manifest unread: the sender's broken pipe must not hide its words."""
    import marshal
    import sys

    from orchestrator import agent

    quick = agent.source().replace(b"\nLOCK_WAIT = 30.0", b"\nLOCK_WAIT = 1.0")
    assert quick != agent.source()
    code = marshal.dumps(compile(quick, "ferry-agent", "exec"))
    head = f"{len(quick)} {len(code)} {sys.implementation.cache_tag}\n".encode()
    monkeypatch.setattr(session, "boot_input", lambda: head + quick + code)
    raw, sig, _ = package({f"u/f{i:05d}": b"%d" % i for i in range(6000)})
    assert len(raw) > 1 << 19  # more than the pipes between them hold
    other = ferry_agent.Host(str(tmp_path))
    local.request("stage", "state", {}, timeout=10)
    other.hold("the pull agent's deploy of app-2 (deployment 7)")
    try:
        with pytest.raises(StepFailed) as refused:
            local.receive("app-1", raw, sig, lambda _need: tmp_path / "unused", timeout=10)
    finally:
        other.let_go()
    assert refused.value.kind == "busy", refused.value.message
    assert "the pull agent's deploy of app-2 (deployment 7)" in refused.value.message


def test_a_transfer_names_the_orchestrators_own_deadline_as_the_agents_stall(monkeypatch, tmp_path):
    """The agent gives up on a silent sender only after the sender's own deadline for the
    step (its timeout and the lock's wait), so a live orchestrator is never cut off: what
    the requests carry, as the agent read them (the session's stdin copied by tee)."""
    import json

    sent = tmp_path.parent / "sent"
    monkeypatch.setattr(
        openssh, "argv", lambda _h, _s, _t, command: ["sh", "-c", f"tee {sent} | {command}"]
    )
    host = SimpleNamespace(name="h1")
    ssh = SimpleNamespace(bulk="openssh", become=False, user="root")
    s = session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]
    data = b"alpha"
    raw, sig, _ = package({"u/a": data})
    frames = tmp_path.parent / "frames"
    frames.write_bytes(f"{hashlib.sha256(data).hexdigest()} 5\n".encode() + data + b"END\n")
    try:
        s.request("stage", "pin", {"key": PUB.hex()}, timeout=10)
        assert s.receive("app-1", raw, sig, lambda _need: frames, timeout=7)["received"] == 1
        with pytest.raises(StepFailed, match="no image unit"):
            s.stream("stage", "image_load", {"id": "app-1", "unit": "web"}, [], timeout=5)
    finally:
        s.close()
    requests = {}
    for line in sent.read_bytes().split(b"\n"):
        if line.startswith(b'{"op": '):
            req = json.loads(line)
            requests[req["op"]] = req["args"]
    assert requests["receive"]["stall"] == 7 + session.AGENT_LOCK_WAIT, requests
    assert requests["image_load"]["stall"] == 5 + session.AGENT_LOCK_WAIT, requests


def test_a_step_past_its_deadline_fails_at_once_and_its_ssh_is_ended(monkeypatch, tmp_path):
    """A host that takes every byte and never answers: the step fails as timed out at its
    deadline, and the connection (here the "ssh", by its PID) is ended then, without
    waiting seconds more for words that could not change the answer."""
    from orchestrator.transport.ssh import StepTimeout

    pidfile = tmp_path / "pid"
    monkeypatch.setattr(
        openssh, "argv", lambda *_: ["sh", "-c", f"echo $$ > {pidfile}; exec 3>&1 cat > /dev/null"]
    )
    host = SimpleNamespace(name="h1")
    ssh = SimpleNamespace(bulk="openssh", become=False, user="root")
    s = session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]
    started = time.monotonic()
    try:
        with pytest.raises(StepTimeout, match="timed out") as late:
            s.request("stage", "state", {}, timeout=1)
        took = time.monotonic() - started
    finally:
        s.close()
    assert 1 <= took < 2.5, took
    # the time it had, and the fix for a host that is only slow
    assert "timed out (the step's 1 s): a host that is only slow needs a longer" in str(late.value)
    assert not Path(f"/proc/{pidfile.read_text().strip()}").exists()  # killed and reaped


def test_the_lock_names_the_login_address_under_become_too(monkeypatch, tmp_path):
    """sudo (become: true) keeps SSH_CLIENT from the agent; the login's shell hands the
    address over, so the lock's note still says where the session holding it came from.
    The real become command line, run by sh with the real sudo, as the login would."""
    import shutil

    if shutil.which("sudo") is None:
        pytest.fail("sudo is part of the lab's set-up (make bootstrap)")
    monkeypatch.setenv("SSH_CLIENT", "198.18.7.9 40022 22")
    monkeypatch.setattr(openssh, "argv", lambda _h, _s, _t, command: ["sh", "-c", command])
    host = SimpleNamespace(name="h1")
    ssh = SimpleNamespace(bulk="openssh", become=True, user="root")
    s = session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]
    try:
        s.request("stage", "pin", {"key": PUB.hex()}, timeout=10)  # a change: the lock is held
        note = (tmp_path / ".ferry" / "agent.lock").read_text()
    finally:
        s.close()
    assert note.endswith("a Ferry session's pin from 198.18.7.9"), note


@pytest.mark.parametrize("docker", ["cli", "wrapped", "killed"])
def test_a_docker_load_that_never_ends_is_stopped_before_the_deadline_and_the_host_let_go(
    monkeypatch, tmp_path, docker
):
    """A host whose Docker engine takes the connection and never answers: `docker load`
    would wait for ever, and the agent with it, holding the host's lock. The real docker
    CLI, against a socket that accepts and stays silent, is stopped a little before the
    step's deadline (here 1 + 6 s: the lock's wait made short), so Ferry hears why the step
    failed; its PIDs, read from the socket's peer credentials, are gone, and the lock is
    free. `wrapped`: docker is a script that runs the CLI as its child (no exec); `killed`:
    a docker that a signal ends at once is not taken for one stopped at the deadline."""
    import shutil
    import socket
    import struct
    import tempfile

    real = shutil.which("docker")
    if real is None:
        pytest.fail("the docker CLI is missing: `make bootstrap` installs docker.io")
    short = Path(tempfile.mkdtemp(prefix="eng-", dir="/tmp"))  # a socket path's 108 bytes
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(short / "s"))
    engine.listen(8)
    callers: list[int] = []
    held: list[socket.socket] = []

    def silent() -> None:
        while True:
            try:
                conn, _ = engine.accept()
            except OSError:
                return
            cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            callers.append(struct.unpack("3i", cred)[0])
            held.append(conn)  # taken, read never, answered never

    threading.Thread(target=silent, daemon=True).start()
    wrapped = docker == "wrapped"
    if docker != "cli":
        (short / "bin").mkdir()
        wrapper = short / "bin" / "docker"
        run = "kill -9 $$" if docker == "killed" else f'{real} "$@"'
        wrapper.write_text(f"#!/bin/sh\necho $$ > {short}/wrapper\n{run}\necho after\n")
        wrapper.chmod(0o755)
        monkeypatch.setenv("PATH", f"{short / 'bin'}:{os.environ['PATH']}")
    (tmp_path / ".ferry").mkdir()
    (tmp_path / ".ferry" / "docker-host").write_text(f"unix://{short}/s\n")
    blobs = {"config": b'{"architecture": "amd64"}', "layer": b"L" * 5000}
    record = {k: {"digest": "sha256:" + hashlib.sha256(v).hexdigest(), "size": len(v)}
              for k, v in blobs.items()}  # fmt: skip
    images = {"web": {"config": record["config"], "layers": [record["layer"]]}}
    content = {"format": "ferry-package/1", "name": "app", "version": "1", "release": "app@1",
               "units": ["web"], "files": [], "images": images}  # fmt: skip
    digest = "sha256:" + hashlib.sha256(ferry_agent.canonical(content)).hexdigest()
    raw = json.dumps({"digest": digest, "content": content}).encode()
    for k, v in blobs.items():
        (short / k).write_bytes(v)
    monkeypatch.setattr(openssh, "argv", lambda _h, _s, _t, command: ["sh", "-c", command])
    monkeypatch.setattr(session, "AGENT_LOCK_WAIT", 6.0)
    host = SimpleNamespace(name="h1")
    ssh = SimpleNamespace(bulk="openssh", become=False, user="root")
    s = session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]
    try:
        s.request("stage", "pin", {"key": PUB.hex()}, timeout=10)
        frames = short / "frames"
        frames.write_bytes(b"END\n")
        assert s.receive("app-1", raw, KEY.sign(raw), lambda _n: frames, timeout=10)["needed"] == 0
        started = time.monotonic()
        args = {"id": "app-1", "unit": "web", "send": [record["layer"]["digest"]], "digest": digest}
        with pytest.raises(StepFailed) as failed:
            s.stream("stage", "image_load", args, [short / "config", short / "layer"], timeout=1)
        took = time.monotonic() - started
    finally:
        s.close()
        engine.close()
        for conn in held:
            conn.close()
    try:
        assert failed.value.kind == "docker", failed.value.message
        if docker == "killed":
            assert "did not finish" not in failed.value.message and took < 1.5, (took, failed)
            return
        assert "did not finish within the step's deadline" in failed.value.message
        assert 1.5 <= took < 6.5, took  # stopped 5 s before Ferry's deadline of 7 s
        assert callers, "the docker CLI never reached the engine's socket"
        pids = callers + ([int((short / "wrapper").read_text())] if wrapped else [])
        for pid in pids:  # the CLI, and the wrapper around it: stopped
            assert (
                not Path(f"/proc/{pid}").exists()
                or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]
            ), f"{pid} still runs"
        probe = ferry_agent.Host(str(tmp_path))
        probe.hold("the test's look", wait=5)  # free: the session's agent has ended
        probe.let_go()
        assert not (tmp_path / ".ferry" / "incoming" / "image-web").exists()
    finally:
        shutil.rmtree(short)


def test_what_ssh_said_before_the_agent_answered_is_not_why_the_session_ended(
    monkeypatch, tmp_path
):
    """At LogLevel INFO ssh prints the host's Banner before the login. An agent that dies
    once it has answered is said to have died, not to have ended with the Banner's words
    (a Banner saying "Connection to … timed out" would read as the host unreachable)."""
    banner = "Connection to this host is monitored; sessions timed out are logged"
    monkeypatch.setattr(
        openssh, "argv", lambda _h, _s, _t, command: ["sh", "-c", f"echo '{banner}' >&2; {command}"]
    )
    host = SimpleNamespace(name="h1")
    ssh = SimpleNamespace(bulk="openssh", become=False, user="root")
    s = session.AgentSession(host, ssh, str(tmp_path), connect_timeout=5)  # type: ignore[arg-type]
    try:
        s.request("stage", "state", {}, timeout=10)
        with pytest.raises(StepFailed) as ended:
            s.request("hook", "run", {"command": "kill -9 $PPID", "timeout": 10}, timeout=10)
    finally:
        s.close()
    said = str(ended.value)  # (here sh, standing in for ssh, says "Killed")
    assert "the agent session ended" in said and "monitored" not in said, said
