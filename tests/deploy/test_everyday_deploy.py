"""Everyday use of `ferry deploy` on the real fleet: refusals are one quiet line with their
exit code, --hosts narrows and never widens, --junit and the GitHub/GitLab outputs report
exactly what happened, CI provenance is recorded, webhooks are told and never fail a run."""

from __future__ import annotations

import json
import threading
import xml.etree.ElementTree as ET
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.cms.models import Deployment, EnvironmentBaseline
from tests.deploy.helpers import build, cms, deploy, host_release, plan, rfc, rid

pytestmark = pytest.mark.fleet

THREE = "h1,h2,h3"


def _deployments() -> int:
    return cms(lambda s: s.scalar(select(func.count()).select_from(Deployment)))


def test_refusals_are_one_line_with_their_exit_code_and_no_traceback(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    build(work, "2.0")
    p = plan(work, fleet, targets=THREE, waves=["100%"])
    # an unknown RFC: exit 2 naming it, before anything is recorded
    res = deploy(run_ferry, p, "shop@1.0", "999")
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.json()["message"] == "--rfc: RFC-999 does not exist (ferry rfc list shows the RFCs)"
    assert "Traceback" not in res.stderr and "IntegrityError" not in res.stderr
    assert _deployments() == 0
    # an RFC for another release: refused (exit 3), one line, the JSON object on stdout
    other = rfc(run_ferry, "shop@2.0")
    res = deploy(run_ferry, p, "shop@1.0", other)
    assert res.returncode == 3, res.stdout + res.stderr
    assert res.json()["status"] == "refused"
    assert f"under RFC-{other}" in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: RFC-{other} does not authorize deploy of shop@1.0: "
                      f"RFC-{other} is for shop@2.0, not shop@1.0"]  # fmt: skip
    assert "Traceback" not in res.stderr and "Warning" not in res.stderr
    # no RFC at all: the banner says so (never "under RFC None"), refused with exit 3
    res = deploy(run_ferry, p, "shop@1.0", None)
    assert res.returncode == 3 and "with no RFC" in res.stderr and "None" not in res.stderr
    assert "Traceback" not in res.stderr
    assert all(host_release(fleet, h) is None for h in fleet.hosts)


def test_hosts_narrows_the_deployment_and_never_widens_it(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    p = plan(work, fleet, targets=THREE, waves=[1, "100%"])
    rfc_id = rfc(run_ferry, "shop@1.0")
    wider = deploy(run_ferry, p, "shop@1.0", rfc_id, "--hosts", "h1,h9")
    assert (
        wider.returncode == 2 and "'h9' names none of the plan's 3 target host(s)" in wider.stderr
    )
    assert _deployments() == 0
    res = deploy(run_ferry, p, "shop@1.0", rfc_id, "--hosts", "h*,!h3")
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.json()["waves"] == [["h1"], ["h2"]]
    assert [host_release(fleet, h) for h in ("h1", "h2", "h3")] == [rid("shop@1.0")] * 2 + [None]
    # two of three hosts do not make the environment's baseline
    assert cms(lambda s: list(s.scalars(select(EnvironmentBaseline)))) == []
    shown = run_ferry("status", "--deployment", str(res.json()["id"]))
    assert "narrowed by --hosts h*,!h3" in shown.stdout


class _Hook(BaseHTTPRequestHandler):
    got: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append(json.loads(body))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def webhook():
    _Hook.got = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T0K3N", _Hook.got
    server.shutdown()
    server.server_close()
    thread.join(10)


def test_a_broken_release_in_github_actions_gives_junit_outputs_summary_annotations_and_hooks(
    clean_small, run_ferry, tmp_path, webhook
):
    fleet, work = clean_small, Path.cwd()
    url, got = webhook
    build(work, "1.0")
    build(work, "2.0")
    p = plan(work, fleet, targets=THREE, waves=[1, "100%"], notify={"webhook": url})
    assert deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0")).returncode == 0
    got.clear()
    (fleet.root_dir("h1") / "shared" / "broken-2.0").write_text("")
    gh = {
        "GITHUB_ACTIONS": "true", "GITHUB_RUN_ID": "4242", "GITHUB_SERVER_URL": "https://github.com",
        "GITHUB_REPOSITORY": "ops/shop", "GITHUB_JOB": "deploy", "GITHUB_SHA": "c0ffee",
        "GITHUB_ACTOR": "rel", "GITHUB_OUTPUT": str(tmp_path / "out"),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
    }  # fmt: skip
    rfc_id = rfc(run_ferry, "shop@2.0")
    junit = tmp_path / "junit.xml"
    res = run_ferry("deploy", str(p), "-r", "shop@2.0", "--rfc", rfc_id, "--junit", str(junit),
                    "-o", "json", env=gh)  # fmt: skip
    assert res.returncode == 4, res.stdout + res.stderr
    dep = res.json()
    assert dep["status"] == "backed-out" and host_release(fleet, "h1") == rid("shop@1.0")
    # JUnit: the failing host check with its output, the failed milestone
    suite = ET.parse(junit).getroot().find("testsuite")
    cases = {c.get("name"): c for c in suite.iter("testcase")}
    failure = cases["h1: steps and checks"].find("failure")
    assert failure is not None, ET.tostring(suite).decode()
    assert failure.get("type") == "milestone"  # the milestone's checks failed on h1
    check = "command: test ! -e {{ shared }}/broken-{{ version }}"
    assert failure.get("message") == f"milestone: {check}"
    assert f"{check}: exit 1" in (failure.text or "")  # with the check's output
    assert cases["milestone 1"].find("failure") is not None
    assert cases["h2: steps and checks"].find("skipped") is not None  # wave 2 never ran
    # GitHub: outputs, summary, one ::error:: per failure
    outputs = dict(line.split("=", 1) for line in (tmp_path / "out").read_text().splitlines())
    assert outputs["deployment_id"] == str(dep["id"]) and outputs["status"] == "backed-out"
    assert outputs["digest"] == dep["digest"] and outputs["exit_code"] == "4"
    summary = (tmp_path / "summary").read_text()
    assert f"Ferry deployment {dep['id']}: backed-out" in summary and "| h1 | backed-out" in summary
    annotations = [x for x in res.stderr.splitlines() if x.startswith("::error ")]
    assert annotations[0] == f"::error title=ferry deploy%3A h1::milestone: {check}"
    assert any("milestone 1" in a for a in annotations)
    # provenance, shown by ferry status --deployment
    shown = run_ferry("status", "--deployment", str(dep["id"]), "-o", "json").json()["deployment"]
    assert shown["ci"]["pipeline_url"] == "https://github.com/ops/shop/actions/runs/4242"
    assert (shown["ci"]["job"], shown["ci"]["commit"], shown["ci"]["actor"]) == (
        "deploy", "c0ffee", "rel",
    )  # fmt: skip
    assert "T0K3N" not in json.dumps(shown)  # the webhook's token is not shown
    text = run_ferry("status", "--deployment", str(dep["id"])).stdout
    assert "from github pipeline 4242" in text and "commit c0ffee" in text
    # the webhook heard start, the failed milestone, the backout and the end, in order
    events = [g["ferry"]["event"] for g in got]
    assert events == ["start", "milestone", "backout", "finish"], got
    assert got[1]["ferry"]["milestone"]["passed"] is False
    assert got[3]["ferry"]["status"] == "backed-out" and got[3]["text"].startswith("ferry: ")
    assert all(g["ferry"]["deployment"] == dep["id"] for g in got)


def test_a_webhook_that_cannot_be_reached_never_fails_the_deployment(clean_small, run_ferry):
    fleet, work = clean_small, Path.cwd()
    build(work, "1.0")
    # a port nothing listens on (127.0.0.1:9 is discard: refused here)
    p = plan(work, fleet, targets="h1", waves=["100%"], notify={"webhook": "http://127.0.0.1:9/x"})
    res = deploy(run_ferry, p, "shop@1.0", rfc(run_ferry, "shop@1.0"))
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.json()["status"] == "succeeded"
    assert "warning: the notify webhook could not be told (start)" in res.stderr
    assert "warning: the notify webhook could not be told (finish)" in res.stderr
    assert "127.0.0.1:9/x" not in res.stderr
