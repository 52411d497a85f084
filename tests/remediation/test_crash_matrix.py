"""The crash-point matrix: `ferry deploy` SIGKILLed at every step boundary of a deployment
with data hooks — each forward step's begin and end, each step of its automatic backout —
and `ferry remediate recover` SIGKILLed during its own backout; then recover (again). After
each point: the CMS says backed-out, every host's `current` is its prior, the data is the
prior's, no lock row and no process of the killed run is left; at the end the next
deployment succeeds. The kill comes from the journal's fault-injection point
(orchestrator/crashpoints.py, FERRY_CRASH_AT), right after a row is committed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.change import config, rfcs
from orchestrator.change.models import RfcRequest
from orchestrator.cms.db import session_scope
from orchestrator.cms.models import Deployment, HostBaseline, HostLock, utcnow
from tests.conftest import FERRY_BIN
from tests.deploy.helpers import build, cms, deploy, host_release, plan, rfc, rid, shared_file

pytestmark = pytest.mark.fleet

HOSTS = ["h1", "h2"]
FORWARD = [(s, p) for s in ("stage", "verify", "snapshot", "install", "activate", "check")
           for p in ("begin", "end")]  # fmt: skip
BACKOUT = [(s, p) for s in ("revert", "reactivate", "restore", "recheck") for p in ("begin", "end")]
DURING_RECOVER = [("revert", "end"), ("restore", "begin")]


def _killed(args: list[str], crash_at: str) -> int:
    """Run `ferry ARGS` until its crash point kills it; wait until its process group is
    empty (its ssh children end when their pipes close); the group's leftovers are a leak."""
    proc = subprocess.Popen(
        [str(FERRY_BIN), *args], env={**os.environ, "FERRY_CRASH_AT": crash_at},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, f"{crash_at}: not killed: {out}{err}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return proc.pid
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # clean up before failing
    pytest.fail(f"{crash_at}: processes of the killed run outlived it by 20 s")


def _recovered(did: int, where: str, prior: str) -> list[str]:
    """What is wrong after recover (empty: CMS, hosts and data agree on the prior)."""
    wrong = []
    # in this process (the command's own code, without its start-up): 22 points × a command
    # start would double the matrix's time on a loaded machine
    from orchestrator.settings import get_settings, reset_settings
    from remediation.recover import RecoverRequest, recover

    reset_settings()
    said: list[str] = []
    try:
        outcome = recover(RecoverRequest(str(did), "alice"), get_settings(), said.append)
    except Exception as exc:  # noqa: BLE001 - reported with the point it happened at
        return [f"{where}: recover raised {type(exc).__name__}: {exc}"]
    if outcome.exit_code != 0:
        return [f"{where}: recover exit {outcome.exit_code}: {said[-3:]}"]
    status = cms(lambda s: s.get(Deployment, did).status)
    if status != "backed-out":
        wrong.append(f"{where}: deployment {did} is {status}")
    for h in HOSTS:
        if host_release(fleet_of[0], h) != rid(prior):
            wrong.append(f"{where}: {h} current is {host_release(fleet_of[0], h)}")
        data = shared_file(fleet_of[0], h, "data/schema")
        if data not in (None, prior.split("@")[1]):
            wrong.append(f"{where}: {h} data is {data}")
    baselines = cms(lambda s: {b.host: b.release for b in s.scalars(select(HostBaseline))})
    if any(baselines.get(h) != prior for h in HOSTS):
        wrong.append(f"{where}: baselines {baselines}")
    locks = cms(lambda s: s.scalar(select(func.count()).select_from(HostLock)))
    if locks:
        wrong.append(f"{where}: {locks} lock row(s) left")
    return wrong


fleet_of: list = []


def _standard_rfc(release: str) -> str:
    """A standard change, raised in this process (as `ferry rfc new` would, a second less)."""
    req = RfcRequest.model_validate(
        {
            "release": release,
            "environment": "dev",
            "model": "standard",
            "template": "any-to-staging",
        }
    )
    with session_scope() as s:
        rfc, _ = rfcs.create(
            s, req, actor="alice", now=utcnow(), models=config.load_change_models(),
            calendar=config.load_calendar(),
        )  # fmt: skip
        assert rfc.status == "authorized", rfc.status
        return str(rfc.id)


@pytest.fixture
def clean_small(small_fleet, prefect_api, ferry_home):
    small_fleet.wipe()
    yield small_fleet
    small_fleet.wipe()


@pytest.mark.timeout(1800)  # 22 killed deployments and their recoveries
def test_sigkill_at_every_step_boundary_then_recover_leaves_cms_hosts_and_data_agreeing(
    clean_small, run_ferry
):
    fleet, work = clean_small, Path.cwd()
    fleet_of[:] = [fleet]
    build(work, "1.0")
    build(work, "2.0")
    plan_path = plan(work, fleet, targets=",".join(HOSTS), strategy="big-bang", waves=None)
    first = deploy(run_ferry, plan_path, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert first.returncode == 0, first.stdout + first.stderr
    assert shared_file(fleet, "h1", "data/schema") == "1.0"

    wrong: list[str] = []
    points = [("forward", s, p) for s, p in FORWARD] + [("backout", s, p) for s, p in BACKOUT]
    points += [("recover", s, p) for s, p in DURING_RECOVER]
    for kind, step, phase in points:
        did = cms(lambda s: s.scalar(select(func.max(Deployment.id)))) + 1
        args = ["deploy", str(plan_path), "-r", "shop@2.0", "--rfc", _standard_rfc("shop@2.0")]
        marker = fleet.root_dir("h2") / "shared" / "broken-2.0"
        if kind == "backout":  # h2's check fails: the milestone fails, both hosts back out
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        where = f"{kind} {step}:{phase}"
        try:
            if kind == "recover":
                _killed(args, "activate:end")
                left = cms(lambda s: s.scalar(select(func.count()).select_from(HostLock)))
                assert left == len(HOSTS), f"{where}: the dead run's locks ({left})"
                _killed(["remediate", "recover", str(did)], f"{step}:{phase}")
            else:
                _killed(args, f"{step}:{phase}")
        finally:
            marker.unlink(missing_ok=True)
        wrong += _recovered(did, where, "shop@1.0")
    assert wrong == [], "\n".join(wrong)
    assert len(points) >= 20

    # and the next deployment succeeds
    last = deploy(run_ferry, plan_path, "shop@2.0", rfc(run_ferry, "shop@2.0"))
    assert last.returncode == 0, last.stdout + last.stderr
    assert {host_release(fleet, h) for h in HOSTS} == {rid("shop@2.0")}
    assert {shared_file(fleet, h, "data/schema") for h in HOSTS} == {"2.0"}
