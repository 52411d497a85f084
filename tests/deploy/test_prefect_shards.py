"""Waves sharded across Prefect workers: a 40-host wave with shard_size 20, submitted with
`ferry deploy --via prefect`, runs as two shard flow runs on two worker processes at once;
the milestone is judged over both. Killing one worker mid-shard fails its hosts (never the
record): the wave's milestone fails, every touched host is backed out, and after
`ferry remediate recover` no host is unaccounted for."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.cms.models import Deployment
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import HOOKS, build, cms, deploy, host_release, plan, rfc, rid
from tests.pg import fresh_postgres_url, postgres_server  # noqa: F401

pytestmark = [pytest.mark.fleet, pytest.mark.postgres]

POOL = "ferry-shards"
HOSTS = [f"h{i}" for i in range(1, 41)]


def _ppid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def workers(clean_fleet, prefect_api, ferry_home, fresh_postgres_url, monkeypatch):  # noqa: F811
    """Three process workers, one flow run at a time each: one takes the deployment's run,
    the other two its shards. Each in its own process group, ended by PID."""
    monkeypatch.setenv("FERRY_DATABASE_URL", fresh_postgres_url)
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect = str(Path(sys.executable).with_name("prefect"))
    procs = []
    for k in range(3):
        log = open(ferry_home / f"worker-{k}.log", "wb")
        procs.append(
            subprocess.Popen(
                [prefect, "worker", "start", "--pool", POOL, "--limit", "1"],
                env=env,
                cwd="/",
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        )
    yield procs
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _shards(dep_id: int) -> list[dict]:
    row = cms(lambda s: s.get(Deployment, dep_id))  # None until the deployment is recorded
    return [] if row is None else row.evidence.get("shards", [])


def test_a_wave_runs_as_shards_on_two_workers_and_a_dead_worker_fails_only_its_hosts(
    clean_fleet, run_ferry, prefect_api, workers
):
    fleet, work = clean_fleet, Path.cwd()
    reg = run_ferry("prefect", "register", "--pool", POOL)
    assert reg.returncode == 0, reg.stderr
    doc = {
        "targets": ",".join(HOSTS), "strategy": "big-bang", "waves": None, "shard_size": 20,
        "milestone": {"max_failed": 0, "deadline": "150s", "soak": "0s"},
    }  # fmt: skip
    # each host's install takes 15 s, so a shard outlasts the few seconds a worker needs to
    # start the other shard's flow run: overlapping is then the workers' doing, not luck
    slow = plan(work, fleet, "slow.yaml", hooks={**HOOKS, "activate": "sleep 15"}, **doc)
    # a dead worker's shard is waited for until the milestone's deadline (+30 s): keep it
    # short; the hooks stay slow, so the kill lands mid-shard (fast shards ended before the
    # test saw both start, under load)
    p = plan(
        work, fleet, "dies.yaml", hooks={**HOOKS, "activate": "sleep 15"},
        **{**doc, "milestone": {**doc["milestone"], "deadline": "90s"}},
    )  # fmt: skip
    build(work, "1.0")
    ok = deploy(
        run_ferry, slow, "shop@1.0", rfc(run_ferry, "shop@1.0"), "--via", "prefect", "--pool", POOL
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = ok.json()
    assert out["status"] == "succeeded"
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in HOSTS)
    assert all(host_release(fleet, h) is None for h in fleet.hosts if h not in HOSTS)
    events = _shards(out["id"])
    started = [e for e in events if e["event"] == "started"]
    assert sorted(h for e in started for h in e["hosts"]) == sorted(HOSTS)
    assert len(started) == 2 and started[0]["runner"]["pid"] != started[1]["runner"]["pid"]
    # both began before either ended: at once, not one after the other
    ended = [e for e in events if e["event"] == "ended"]
    assert len(ended) == 2 and max(e["at"] for e in started) < min(e["at"] for e in ended), events

    # a worker dies mid-shard: its hosts fail, the milestone fails, every touched host goes back
    build(work, "1.1")
    args = ["deploy", str(p), "-r", "shop@1.1", "--rfc", rfc(run_ferry, "shop@1.1"), "-o", "json",
            "--via", "prefect", "--pool", POOL]  # fmt: skip
    proc = subprocess.Popen([str(FERRY_BIN), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    dep_id = out["id"] + 1
    deadline = time.monotonic() + 240
    while True:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        started = [e for e in _shards(dep_id) if e["event"] == "started"]
        if len(started) == 2:
            break
        time.sleep(0.3)
    # the machine running that shard dies: its worker and the shard's process, at once
    victim = started[0]["runner"]["pid"]
    worker_pid, mine = victim, {w.pid for w in workers}
    while worker_pid not in mine:
        worker_pid = _ppid(worker_pid)
        assert worker_pid > 1, "the shard's process is not a child of a test worker"
    os.killpg(worker_pid, signal.SIGKILL)
    os.kill(victim, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode in (4, 5), stdout + stderr
    rec = cms(lambda s: s.get(Deployment, dep_id))
    assert rec.status in ("backed-out", "failed"), rec.status
    lost = set(started[0]["hosts"])
    failed = {o["host"] for o in rec.evidence["outcomes"] if not o["ok"]}
    assert lost <= failed, (lost, failed)  # never counted as deployed

    rec_run = run_ferry("remediate", "recover", str(dep_id), "-o", "json")
    assert rec_run.returncode == 0, rec_run.stdout + rec_run.stderr
    status = run_ferry("status", "-o", "json").json()
    assert status["needs_remediation"] == [], status["needs_remediation"]
    # every host is accounted for: on its prior release (1.0), none half-way
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in HOSTS), {
        h: host_release(fleet, h) for h in HOSTS
    }
