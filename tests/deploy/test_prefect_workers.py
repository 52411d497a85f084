"""Ferry's flows on Prefect's distributed engine: `ferry prefect register` makes the work pool
and deployments, a `prefect worker` process started apart from the submitting one runs the
deployment against the fleet with the CMS on PostgreSQL, `ferry deploy --via prefect`
follows it with the same progress and exit code, and a backed-out run ends Failed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import build, deploy, plan, rfc
from tests.pg import fresh_postgres_url, postgres_server  # noqa: F401

pytestmark = [pytest.mark.fleet, pytest.mark.postgres]

POOL = "ferry-test"


def _flow_run(api: str, flow_run_id: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=30) as r:
        return json.loads(r.read())


def _flow_run_id(stderr: str) -> str:
    line = next(ln for ln in stderr.splitlines() if ln.startswith("submitted to work pool"))
    return line.rsplit("(", 1)[1].rstrip(")")


@pytest.fixture
def worker(clean_small, prefect_api, ferry_home, fresh_postgres_url, monkeypatch):  # noqa: F811
    """A Prefect process worker on the pool, its own process group, ended by PID."""
    monkeypatch.setenv("FERRY_DATABASE_URL", fresh_postgres_url)
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "true")  # the session's is off
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(ferry_home / "worker.log", "wb")
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("prefect")), "worker", "start", "--pool", POOL],
        env=env, cwd="/", stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    yield proc
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.close()


def test_a_worker_runs_submitted_deployments_and_prefect_shows_their_outcome(
    clean_small, run_ferry, prefect_api, worker
):
    fleet, work = clean_small, Path.cwd()
    reg = run_ferry("prefect", "register", "--pool", POOL, "-o", "json")
    assert reg.returncode == 0, reg.stderr
    names = {d["deployment"] for d in reg.json()["deployments"]}
    assert names == {
        f"{flow}/{POOL}"
        for flow in (
            "deploy_release",
            "deploy_shard",
            "deploy_request",
            "back_out_deployment",
            "recover_deployment",
        )
    }
    again = run_ferry("prefect", "register", "--pool", POOL, "-o", "json")
    assert again.returncode == 0 and not again.json()["deployments"][0]["pool_created"]

    build(work, "1.0")
    rfc_id = rfc(run_ferry, "shop@1.0")
    unknown = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc_id, "--via", "prefect")
    assert unknown.returncode == 2 and "--pool ferry: no Prefect deployment" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert run_ferry("status", "-o", "json").json()["deployments"] == []  # none recorded
    ok = deploy(
        run_ferry,
        plan(work, fleet),
        "shop@1.0",
        rfc_id,
        "--via",
        "prefect",
        "--pool",
        POOL,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.json()["status"] == "succeeded"
    # the whole log relayed, its last batch too (it can land after the run is Completed: in
    # one CI run none of it had), but not the line that marks its end
    assert any(line.startswith("wave 3/3:") for line in ok.stderr.splitlines()), ok.stderr
    assert "this run's log ends here" not in ok.stderr
    run = _flow_run(prefect_api, _flow_run_id(ok.stderr))
    assert run["state_type"] == "COMPLETED" and run["work_pool_name"] == POOL
    assert run["deployment_id"] is not None  # run by the pool's worker, not in-process

    build(work, "1.1")
    (fleet.root_dir("h3") / "shared").mkdir(parents=True, exist_ok=True)
    (fleet.root_dir("h3") / "shared" / "broken-1.1").write_text("x")  # h3 is in wave 2
    bad = deploy(
        run_ferry,
        plan(work, fleet),
        "shop@1.1",
        rfc(run_ferry, "shop@1.1"),
        "--via",
        "prefect",
        "--pool",
        POOL,
    )
    assert bad.returncode == 4, bad.stdout + bad.stderr
    out = bad.json()
    assert out["status"] == "backed-out" and out["hosts"]["h3"]["status"] == "backed-out"
    run = _flow_run(prefect_api, _flow_run_id(bad.stderr))
    assert run["state_type"] == "FAILED" and "milestone 2 failed" in run["state"]["message"]
    status = run_ferry("status", "--deployment", str(out["id"]), "-o", "json")
    assert status.returncode == 0 and status.json()["deployment"]["status"] == "backed-out", (
        status.stdout
    )
