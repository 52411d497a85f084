"""JUnit XML reports for CI (`--junit FILE`), from a deployment's report or a drift audit.

CI systems (GitLab's `artifacts: reports: junit:`, GitHub test reporters, Jenkins) show a
JUnit file as tests passed and failed. A deployment is one suite: one test case per host
check (the host's steps through its checks; a failure names the step and carries its
output; a host its wave never reached is skipped) and one per milestone. A drift audit is
one suite with one test case per host (an unmanaged host, with no baseline, is skipped).
Written with junitparser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from junitparser import Error, Failure, JUnitXml, Skipped, TestCase, TestSuite


def deployment_suite(report: dict[str, Any]) -> TestSuite:
    suite = TestSuite(f"ferry deploy {report['release']} to {report['environment']}")
    outcomes = {o["host"]: o for o in report.get("outcomes", [])}
    for index, wave in enumerate(report["waves"], start=1):
        for host in wave:
            h = report["hosts"][host]
            case = TestCase(f"{host}: steps and checks", classname=f"deploy.wave-{index}")
            failure = h.get("failure")
            if failure:
                out = (outcomes.get(host) or {}).get("output") or ""
                result = Failure(f"{failure['step']}: {failure['reason']}", type_=failure["step"])
                result.text = "\n".join(x for x in (failure["reason"], out) if x)
                case.result = [result]
            elif h["status"] == "untouched":
                case.result = [Skipped(f"not reached: deployment {report['status']}")]
            case.system_out = f"{host}: {h['status']} (release {h['release']})"
            suite.add_testcase(case)
    for m in report["milestones"]:
        case = TestCase(f"milestone {m['wave']}", classname="deploy.milestones")
        if not m["passed"]:
            case.result = [Failure(m["reason"], type_="milestone")]
        case.system_out = m["reason"]
        suite.add_testcase(case)
    if report["status"] in ("refused", "halted", "aborted"):
        case = TestCase("change gate and run", classname="deploy")
        result = Error(str(report.get("message") or report.get("reason") or report["status"]))
        result.type = report["status"]
        case.result = [result]
        suite.add_testcase(case)
    return suite


def drift_suite(data: dict[str, Any]) -> TestSuite:
    suite = TestSuite(
        "ferry remediate drift" + (f" {data['environment']}" if data.get("environment") else "")
    )
    for host, h in data["hosts"].items():
        case = TestCase(host, classname="drift")
        if h["state"] == "unmanaged":  # no baseline in the CMS: nothing to compare with
            case.result = [Skipped(f"unmanaged: {h['detail']}")]
        elif h["state"] != "ok":
            case.result = [Failure(f"{h['state']}: {h['detail']}", type_=h["state"])]
        case.system_out = f"{host}: {h['state']}"
        suite.add_testcase(case)
    return suite


def write(path: Path, *suites: TestSuite) -> None:
    xml = JUnitXml()
    for suite in suites:
        suite.update_statistics()
        xml.add_testsuite(suite)
    xml.update_statistics()
    path.parent.mkdir(parents=True, exist_ok=True)
    xml.write(str(path), pretty=True)
