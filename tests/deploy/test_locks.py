"""One deployment per host at a time, on the real fleet: two concurrent `ferry deploy` runs
to overlapping hosts never interleave. The second is refused (exit 3) naming the holder and
records nothing, on SQLite and PostgreSQL; with --wait-lock it queues behind the first and
plans its priors from what the first left."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.cms import db
from orchestrator.cms.models import RFC, Deployment, HostLock, HostStep
from orchestrator.settings import reset_settings
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import (
    BROKEN_CHECK,
    build,
    cms,
    deploy,
    dumps,
    host_release,
    plan,
    rfc,
    rid,
)
from tests.pg import fresh_postgres_url, postgres_server  # noqa: F401

pytestmark = pytest.mark.fleet

SLOW = {"max_failed": 0, "deadline": "120s", "soak": "2s", "checks": [BROKEN_CHECK]}
TWO_WAVES = [1, "100%"]


def _start(
    plan_path: Path, release: str, rfc_id: str, *extra: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    return subprocess.Popen(
        [str(FERRY_BIN), "deploy", str(plan_path), "--release", release, "--rfc", rfc_id,
         "-o", "json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def _until_locked_by(deployment_id: int, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        held = cms(lambda s: set(s.scalars(select(HostLock.deployment_id))))
        if held == {deployment_id}:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)
    pytest.fail(f"deployment {deployment_id} never held its hosts' locks")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, clean_small, monkeypatch):
    if request.param == "postgresql":
        monkeypatch.setenv("FERRY_DATABASE_URL", request.getfixturevalue("fresh_postgres_url"))
        reset_settings()
        db.dispose_all()
    yield clean_small
    db.dispose_all()


def test_a_second_deploy_to_overlapping_hosts_is_refused_naming_the_holder(backend, run_ferry):
    fleet, work = backend, Path.cwd()
    build(work, "1.0")
    build(work, "2.0")
    first_rfc = rfc(run_ferry, "shop@1.0")
    second_rfc = rfc(run_ferry, "shop@2.0")
    first = _start(
        plan(work, fleet, "all.yaml", milestone=SLOW, waves=TWO_WAVES), "shop@1.0", first_rfc
    )
    try:
        _until_locked_by(1, first)
        rack_a = plan(work, fleet, "rack-a.yaml", targets="rack-a")
        second = deploy(run_ferry, rack_a, "shop@2.0", second_rfc)
        running = cms(lambda s: s.get(Deployment, 1).status)
    finally:
        out, err = first.communicate(timeout=600)
    assert second.returncode == 3, second.stdout + second.stderr
    assert "locked by deployment 1 of shop@1.0 by alice since " in second.stderr
    assert "--wait-lock" in second.stderr and "Traceback" not in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert running in ("planned", "running")
    # the refused run recorded nothing and its RFC is untouched
    assert cms(lambda s: s.scalar(select(func.count()).select_from(Deployment))) == 1
    assert cms(lambda s: s.get(RFC, int(second_rfc)).status) in ("authorized", "scheduled")
    # the first ran undisturbed to its end, and let go of every host
    assert first.returncode == 0, out + err
    assert {host_release(fleet, h) for h in fleet.hosts} == {rid("shop@1.0")}
    assert cms(lambda s: s.scalar(select(func.count()).select_from(HostLock))) == 0
    steps = cms(lambda s: set(s.scalars(select(HostStep.deployment_id))))
    assert steps == {1}


def test_with_wait_lock_a_second_deploy_queues_and_plans_from_what_the_first_left(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    for version in ("1.0", "2.0"):
        build(work, version)
    first_rfc, second_rfc = rfc(run_ferry, "shop@1.0"), rfc(run_ferry, "shop@2.0")
    first = _start(
        plan(work, fleet, "all.yaml", milestone=SLOW, waves=TWO_WAVES), "shop@1.0", first_rfc
    )
    try:
        _until_locked_by(1, first)
        second = _start(
            plan(work, fleet, "b.yaml", waves=TWO_WAVES),
            "shop@2.0",
            second_rfc,
            "--wait-lock",
            "5m",
        )
        out2, err2 = second.communicate(timeout=600)
    finally:
        out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, out1 + err1
    assert second.returncode == 0, out2 + err2
    assert "waiting for the lock of 12 host(s): deployment 1 of shop@1.0 by alice" in err2
    assert {host_release(fleet, h) for h in fleet.hosts} == {rid("shop@2.0")}
    # never interleaved: the second's first step came after the first had finished
    first_done = cms(lambda s: s.get(Deployment, 1).finished_at)
    second_start = cms(
        lambda s: s.scalar(select(func.min(HostStep.started_at)).where(HostStep.deployment_id == 2))
    )
    assert second_start > first_done
    # its priors are what the first left (planned again once it held the hosts)
    hosts = cms(lambda s: s.get(Deployment, 2).rollout["hosts"])
    assert {h["prior"]["release"] for h in hosts.values()} == {"shop@1.0"}
    assert cms(lambda s: s.scalar(select(func.count()).select_from(HostLock))) == 0


def test_a_host_another_agent_is_changing_is_waited_for_then_refused_alone_naming_it(
    clean_small, run_ferry
):
    """The CMS's locks serialize one Ferry's runs; on the host, one agent process changes it
    at a time: the pull daemon, or a session of another Ferry with its own CMS. A short hold
    is waited out; a long one fails that host alone, in words naming the holder, however
    short the step's own timeout (the agent says it waits: the deadline moves)."""
    from orchestrator.agent import ferry_agent

    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    assert (
        deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    )
    build(work, "2.0")
    # the lab's hosts share this kernel: the test holds their agent.lock as another agent would
    busy, brief = (ferry_agent.Host(str(fleet.root_dir(h))) for h in ("h7", "h1"))
    busy.hold("another Ferry's deploy of shop@9")
    brief.hold("the pull agent's deploy of shop@1.0 (deployment 1)")
    timer = threading.Timer(2.0, brief.let_go)
    timer.start()
    tolerant = {"max_failed": 1, "deadline": "120s", "soak": "0s", "checks": [BROKEN_CHECK]}
    p = plan(work, fleet, name="tolerant.yaml", milestone=tolerant, timeouts={"step": "8s"})
    try:
        res = deploy(run_ferry, p, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    finally:
        timer.join()
        busy.let_go()
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["milestones"][-1]["failed"] == ["h7"], dumps(out["milestones"])
    reason = dumps(out["hosts"]["h7"])
    assert (
        f"another Ferry agent is changing this host (pid {os.getpid()}, another Ferry's" in reason
    )
    assert "a Ferry session's receive waited 30 s for it" in reason, reason  # not a timeout
    journal = cms(
        lambda s: {
            (st.step, st.status)
            for st in s.scalars(select(HostStep).where(HostStep.host == "h7"))
            if st.deployment_id == 2
        }
    )
    assert journal == {("stage", "refused")}  # nothing to back out of it
    assert host_release(fleet, "h7") == rid("shop@1.0")  # refused before it was touched
    assert {host_release(fleet, h) for h in fleet.hosts if h != "h7"} == {rid("shop@2.0")}


def test_a_host_cut_off_in_the_middle_of_a_transfer_frees_its_lock_once_the_sender_is_overdue(
    clean_small, run_ferry
):
    """A partition mid-transfer: Ferry gives up on the host at its step's deadline and the
    host's sshd never hears of it (its link is down, and TCP keepalive takes two hours).
    The agent, blocked in a read, ends once that read has waited the request's stall (the
    step's deadline: 5 s and the lock's 30 s), so the host is free again for the next
    deployment or the pull daemon, the link still down."""
    from orchestrator.agent import ferry_agent

    fleet, work = clean_small, Path.cwd()
    build(work, "1.0", extra={"blob.bin": os.urandom(48 << 20)})
    p = plan(work, fleet, name="short.yaml", timeouts={"step": "5s", "connect": "3s"})
    incoming = fleet.root_dir("h1") / ".ferry" / "incoming"  # h1: wave 1's host
    lock = fleet.root_dir("h1") / ".ferry" / "agent.lock"
    with fleet.faulted("h1", "slow", rate="8mbit"):  # 48 MiB: ~50 s to send
        proc = _start(p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
        try:
            _until_arriving(incoming, proc)
            agent_pid = int(lock.read_text().split()[1])  # the holder's note: count pid …
            with fleet.faulted("h1", "down"):
                cut, freed = time.monotonic(), []
                probe = ferry_agent.Host(str(fleet.root_dir("h1")))

                def take() -> None:  # as the next deployment or the pull daemon would
                    probe.hold("the test", wait=120)
                    freed.append(time.monotonic() - cut)

                taker = threading.Thread(target=take)
                taker.start()
                stdout, stderr = proc.communicate(timeout=150)
                taker.join(timeout=150)
                probe.let_go()
                assert freed, "the agent lock was still held 120 s after the cut"
                # the lock is free: its agent ends (it lets go just before it exits)
                assert _ends_within(agent_pid, 5.0), f"agent {agent_pid} still runs"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 4, stdout + stderr
    failure = json.loads(stdout)["hosts"]["h1"]["failure"]
    assert failure["step"] == "stage", failure
    # said as what it was: ssh's keepalives went unanswered, not the agent dying
    assert "not responding" in failure["reason"] and "agent" not in failure["reason"], failure
    assert 25 <= freed[0] <= 45, freed  # its read waited 35 s from about the cut
    assert host_release(fleet, "h1") is None
    # the transfer's progress was shown while it ran (a pipeline's plain lines on stderr)
    moving = [ln for ln in stderr.splitlines() if "wave 1: 0/1 hosts done" in ln]
    assert any(" MB sent (" in ln for ln in moving), stderr


def _ends_within(pid: int, seconds: float) -> bool:
    """Process `pid` is gone, or a zombie (ended, not yet reaped), within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _until_arriving(incoming: Path, proc: subprocess.Popen, size: int = 1 << 20) -> None:
    """Wait (60 s at most) until an object of more than `size` bytes is arriving in
    `incoming` (its .part file), the deployment `proc` still running."""
    deadline = time.monotonic() + 60
    while True:
        for part in incoming.glob("*.part"):
            try:
                if part.stat().st_size > size:
                    return
            except FileNotFoundError:  # (one just arrived whole)
                pass
        assert time.monotonic() < deadline, "the blob never started to arrive"
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.1)


@pytest.mark.parametrize("warm", [False, True])
def test_a_second_sigterm_aborts_at_once_and_recover_puts_the_hosts_back(
    clean_small, run_ferry, tmp_path, warm
):
    """The first SIGTERM stops at the next safe point, which may be a long transfer away; a
    second aborts there and then (exit 130), naming the command that puts the hosts back,
    and that command does. `warm`: the deploy runs in a warm process's child, which tells
    its caller the code before it ends."""
    import re
    import signal

    from tests.deploy.test_warm import _stop, _wait_warm, _warm_env

    fleet, work = clean_small, Path.cwd()
    env = _warm_env(tmp_path) if warm else None
    if env is not None:
        assert subprocess.run([str(FERRY_BIN), "rfc", "list"], env=env).returncode == 0
        warm_pid = _wait_warm(env)
    build(work, "1.0")
    p = plan(work, fleet, targets="h1,h2", waves=None, strategy="big-bang")
    assert deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    build(work, "2.0", extra={"blob.bin": os.urandom(24 << 20)})
    incoming = fleet.root_dir("h1") / ".ferry" / "incoming"
    with fleet.faulted("h1", "slow", rate="8mbit"):  # 24 MiB: ~25 s to send
        proc = _start(p, "shop@2.0", rfc(run_ferry, "shop@2.0"), env=env)
        try:
            _until_arriving(incoming, proc)
            proc.send_signal(signal.SIGTERM)
            time.sleep(1)
            second = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=60)
            took = time.monotonic() - second
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if env is not None:
                _stop(warm_pid)
    assert proc.returncode == 130, stderr
    assert took < 5, f"{took:.1f} s after the second SIGTERM"  # not the transfer's ~20 s
    said = re.search(r"aborting now.*`ferry remediate recover (\d+)`", stderr)
    assert said, stderr
    res = run_ferry("remediate", "recover", said.group(1), "-o", "json")
    assert res.returncode == 0, res.stdout + res.stderr
    for host in ("h1", "h2"):
        assert host_release(fleet, host) == rid("shop@1.0")
