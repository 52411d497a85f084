"""One agent session per host, on the real fleet: one login per host, the cheapest no-op,
and a host whose agent dies mid-session fails and is backed out alone."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from orchestrator.cms.models import HostStep
from tests.deploy.helpers import (
    HOOKS,
    build,
    cms,
    deploy,
    files_match,
    host_release,
    plan,
    rfc,
    rid,
    shared_file,
)

pytestmark = pytest.mark.fleet


def test_a_deploy_logs_in_once_per_host_and_a_redeploy_is_one_request_per_host(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet, strategy="big-bang", waves=None)
    first = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert first.returncode == 0, first.stderr
    # every step, check and the final prune of a host share its one session
    assert first.json()["logins"] == len(fleet.hosts)
    again = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert again.returncode == 0, again.stderr
    out = again.json()
    assert out["logins"] == len(fleet.hosts) and out["bytes_sent"] == 0
    rows = cms(
        lambda s: list(s.scalars(select(HostStep).where(HostStep.deployment_id == out["id"])))
    )
    # the cheapest no-op: one request per host (inspect), nothing re-sent or re-run
    assert sorted(r.host for r in rows) == sorted(fleet.hosts)
    assert {r.step for r in rows} == {"stage"}
    assert all(r.status == "succeeded" and r.detail["already_current"] for r in rows)
    assert all(host_release(fleet, h) == rid("shop@1.0") for h in fleet.hosts)


def test_a_host_whose_agent_dies_mid_session_fails_and_is_backed_out_alone(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    build(work, "2.0")
    p = plan(work, fleet, strategy="big-bang", waves=None, targets="h1,h2,h3")
    assert deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    # on h2, installing 2.0 only, the activate hook kills its own parent: the agent serving
    # the session (the backout's reactivate renders the same hook for 1.0: it lets it live).
    # It runs on, in a session of its own, as a migration would: the backout's agent ends
    # it before it restores anything, so it never writes over the restored data
    kill = ('if [ "{{ host }}" = h2 ] && [ "{{ version }}" = 2.0 ]; then kill -9 $PPID; '
            'sleep 8; echo 2.0 > {{ shared }}/data/schema; fi')  # fmt: skip
    hooks = {**HOOKS, "activate": kill}
    p2 = plan(work, fleet, "p2.yaml", strategy="big-bang", waves=None, targets="h1,h2,h3",
              hooks=hooks, milestone={"max_failed": 1, "checks": []})  # fmt: skip
    rfc_id = rfc(run_ferry, "shop@2.0")
    started = time.monotonic()
    res = deploy(run_ferry, p2, "shop@2.0", rfc_id)
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.json()
    assert out["status"] == "succeeded"
    assert out["hosts"]["h2"]["status"] == "backed-out"
    assert out["hosts"]["h2"]["failure"]["step"] == "activate"
    assert "agent session ended" in out["hosts"]["h2"]["failure"]["reason"]
    assert [r["host"] for r in out["backout"]] == ["h2"]
    assert host_release(fleet, "h2") == rid("shop@1.0") and files_match(fleet, "h2", "shop@1.0")
    assert shared_file(fleet, "h2", "data/schema") == "1.0"  # its data restored too
    for host in ("h1", "h3"):
        assert out["hosts"][host]["status"] == "deployed"
        assert host_release(fleet, host) == rid("shop@2.0")
    time.sleep(max(0.0, started + 10 - time.monotonic()))  # past the orphan's 8 s
    assert shared_file(fleet, "h2", "data/schema") == "1.0"  # it was ended, not let write


# in the deploy's process: each CA bundle load, with the names of the functions calling it
CA_LOADS = """\
import atexit, os, ssl, traceback
_calls = []
_load = ssl.SSLContext.load_verify_locations
def _counted(self, *args, **kwargs):
    _calls.append(" ".join(f.name for f in traceback.extract_stack()))
    return _load(self, *args, **kwargs)
ssl.SSLContext.load_verify_locations = _counted
atexit.register(lambda: open(os.environ["CA_LOADS"], "w").write("\\n".join(_calls)))
"""


def test_the_flow_engines_look_ups_share_the_runs_prefect_client(clean_small, run_ferry, tmp_path):
    """Each Prefect client loads the CA bundle (~20–60 ms of CPU here, even for a plain-HTTP
    server). The flow engine looks up the server's default result storage twice; with no
    client current each look-up made its own, now they use the run's one sync client."""
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet, strategy="big-bang", waves=None, targets="h1")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(CA_LOADS)
    loads = tmp_path / "ca-loads"
    env = {"PYTHONPATH": str(site), "CA_LOADS": str(loads), "FERRY_WARM": "0"}
    rfc_id = rfc(run_ferry, "shop@1.0")
    args = ("deploy", str(p), "--release", "shop@1.0", "--rfc", rfc_id, "-o", "json")
    out = run_ferry(*args, env=env)
    assert out.returncode == 0, out.stderr
    stacks = loads.read_text().splitlines()
    assert any("run_deployment" in st for st in stacks)  # the run's own client: counted
    assert not [st for st in stacks if "_read_server_default_result_storage_block_id" in st]


@pytest.mark.parametrize("bulk", ["openssh", "paramiko"])
def test_a_hung_up_session_ends_by_itself_and_a_later_request_opens_another(small_fleet, bulk):
    """A host's session is released with an EOF and not waited for (its ssh exits while the
    other hosts work); what is left is reaped at the end, and nothing keeps running."""
    session = _session(small_fleet, "h1", bulk)
    try:
        session.request("hook", "run", {"command": "true", "timeout": 10}, timeout=20)
        pipe = session.hang_up()
        assert pipe is not None and session.hang_up() is None  # one connection, given once
        deadline = time.monotonic() + 10
        while not pipe.ended() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pipe.ended()  # the agent saw EOF and ended: nothing killed it
        pipe.close()
        out = session.request("hook", "run", {"command": "echo again", "timeout": 10}, timeout=20)
        assert out["output"].strip() == "again" and session.logins == 2
    finally:
        session.close()


@pytest.mark.parametrize("bulk", ["openssh", "paramiko"])
def test_a_step_past_its_deadline_fails_then_and_the_next_request_opens_a_new_session(
    small_fleet, bulk
):
    """A hook that outlives its step's deadline: the step fails as timed out at the deadline
    (its connection ended then, without waiting for words), and the host's next request
    opens a new session and is answered."""
    from orchestrator.transport.ssh import StepTimeout

    session = _session(small_fleet, "h2", bulk)
    try:
        session.request("stage", "state", {}, timeout=20)  # logged in: the step alone is timed
        pipe = session._pipe
        started = time.monotonic()
        with pytest.raises(StepTimeout, match="timed out"):
            # (lock: false, so that the sleep left running keeps no later test off the host)
            hook = {"command": "sleep 8", "timeout": 60, "lock": False}
            session.request("hook", "run", hook, timeout=2)
        took = time.monotonic() - started
        assert 2 <= took < 3.5, took
        assert pipe is not None and pipe.ended()  # its connection is gone already
        assert session.request("stage", "state", {}, timeout=20) and session.logins == 2
    finally:
        session.close()


def _session(fleet: Any, name: str, bulk: str) -> Any:
    """An agent session to lab host `name` over `bulk` (openssh or paramiko), not yet open."""
    from orchestrator.inventory import Host, SSHSettings
    from orchestrator.transport.session import AgentSession

    ssh = SSHSettings.model_validate(
        {"identity_file": fleet.client_key_path, "known_hosts": fleet.known_hosts_path,
         "connect_timeout": 5, "proxy_jump": fleet.proxy_jump, "bulk": bulk}
    )  # fmt: skip
    host = Host(name=name, address=fleet.address(name), port=22, groups=(), deploy_root="/srv/app")
    return AgentSession(host, ssh, "/srv/app", connect_timeout=5)
