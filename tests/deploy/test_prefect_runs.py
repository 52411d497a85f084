"""What a real Prefect server shows of Ferry's deployments is their outcome: a success is a
Completed flow run, a backed-out one is Failed with the milestone and hosts in its message
(and its wave's task run Failed), the run is named and tagged for what runs, its log holds
Ferry's progress lines, and its artifacts are keyed per CMS."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from orchestrator.flows import artifact_key
from orchestrator.prefect_deployments import cms_tag
from orchestrator.settings import get_settings
from tests.deploy.helpers import build, deploy, plan, rfc

pytestmark = pytest.mark.fleet


def _api(url: str, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{url}/{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _flow_run(url: str, deployment_id: int) -> dict[str, Any]:
    # other tests' Ferry homes share this Prefect server, each with its own deployment #1
    mine = {"name": {"like_": f"#{deployment_id}"}, "tags": {"all_": [cms_tag(_cms())]}}
    runs = _api(url, "flow_runs/filter", {"flow_runs": mine})
    mine = [r for r in runs if r["name"].endswith(f" #{deployment_id}")]
    assert len(mine) == 1, [r["name"] for r in runs]
    return mine[0]


def _cms() -> str:
    return get_settings().cms_url


def _log_lines(url: str, flow_run_id: str) -> list[str]:
    logs = _api(url, "logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}})
    return [entry["message"] for entry in logs]


def _task_states(url: str, flow_run_id: str) -> dict[str, str]:
    runs = _api(url, "task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    # a task run's name is its task's name and a random suffix (wave-2-a1b)
    return {r["name"].rsplit("-", 1)[0]: r["state_type"] for r in runs}


def test_prefect_shows_a_success_completed_and_a_backout_failed_naming_the_milestone(
    clean_small, run_ferry, prefect_api, monkeypatch
):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    ok = deploy(run_ferry, plan(work, fleet), "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert ok.returncode == 0, ok.stderr
    good = ok.json()
    run = _flow_run(prefect_api, good["id"])
    assert run["name"] == f"shop@1.0 → dev #{good['id']}"
    assert run["state_type"] == "COMPLETED", run["state"]
    assert {"release:shop@1.0", "environment:dev", "model:standard"} <= set(run["tags"])
    assert any(t.startswith("rfc:") for t in run["tags"])

    build(work, "1.1")
    (fleet.root_dir("h3") / "shared").mkdir(parents=True, exist_ok=True)
    (fleet.root_dir("h3") / "shared" / "broken-1.1").write_text("x")  # h3 is in wave 2
    rfc_id = rfc(run_ferry, "shop@1.1")
    monkeypatch.setenv("PREFECT_LOGGING_TO_API_ENABLED", "true")  # the session's is off
    bad = deploy(run_ferry, plan(work, fleet), "shop@1.1", rfc_id)
    assert bad.returncode == 4, bad.stdout + bad.stderr
    out = bad.json()
    assert out["status"] == "backed-out"
    run = _flow_run(prefect_api, out["id"])
    assert run["state_type"] == "FAILED", run["state"]
    message = run["state"]["message"]
    assert "milestone 2 failed" in message and "h3" in message, message
    assert "backed-out:" in message and "h1" in message, message  # wave 1's host went back
    tasks = _task_states(prefect_api, run["id"])
    assert tasks["wave-1"] == "COMPLETED" and tasks["wave-2"] == "FAILED", tasks
    assert "wave-3" not in tasks and tasks["backout"] == "COMPLETED", tasks
    lines = _log_lines(prefect_api, run["id"])
    assert any(line.startswith("wave 2/3:") for line in lines), lines
    assert any("milestone 2 FAILED" in line for line in lines), lines

    # artifacts are keyed by this CMS, so another Ferry home's deployment #N never collides
    key = artifact_key(get_settings().cms_url, out["id"])
    assert key != artifact_key(get_settings().cms_url + "-elsewhere", out["id"])
    arts = _api(prefect_api, "artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
    assert len(arts) == 1 and "backed-out" in arts[0]["description"]
