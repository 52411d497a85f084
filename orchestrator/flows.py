"""Prefect flows: `deploy_release(deployment_id)` runs a recorded deployment.

The flow's one parameter is the deployment id, a plain value: everything else — the
rollout with every rendered command, the hosts and how to reach them, the RFC — is loaded
from the CMS, and the package from the DML, so the same flow runs in this process (the
embedded default) or on a Prefect worker on another machine. One task per stage and per
wave (not per host: Prefect costs 20–160 ms per task here, and its embedded mode drops task
records at exit, so Ferry's own journal lives in the CMS). The flow holds no business
rules; it sequences DeploymentRun's methods and publishes a result artifact.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from orchestrator import crashlog
from orchestrator.deployment import DeploymentRun
from orchestrator.errors import AuthorizationRefused
from orchestrator.lifecycle import Status


def say(message: str) -> None:
    """Progress for people: stderr, so `--output json` stays parseable on stdout."""
    print(message, file=sys.stderr, flush=True)


def install_stop_handlers(stop: threading.Event, progress: Any) -> None:
    """SIGINT/SIGTERM: stop at the next safe point and back out; a second one aborts."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            raise KeyboardInterrupt
        stop.set()
        progress(
            f"received {signal.Signals(signum).name}: stopping at the next safe point, then "
            "backing out (send it again to abort at once; `ferry remediate recover` finishes)"
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# Tasks take the run object (a live handle inside this flow run); the flow's own parameter
# stays a plain deployment id.
@task(name="preflight", cache_policy=NO_CACHE)
def preflight(run: DeploymentRun) -> bool:
    """Authorize the deployment and check the release in; nothing has touched a host yet."""
    return run.start()


@task(name="wave", cache_policy=NO_CACHE)
def run_wave(run: DeploymentRun, index: int) -> dict[str, Any]:
    if index > 1:  # wave 1's hosts were authorized by preflight a moment ago, with all others
        run.gate_wave(index)
    return run.run_wave(index).to_dict()


@task(name="backout", cache_policy=NO_CACHE)
def back_out(run: DeploymentRun, reason: str) -> str:
    return run.fail(run.last_verdict, reason)


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(run: DeploymentRun) -> str:
    return run.succeed()


def flow_run_name() -> str:
    from prefect.runtime import flow_run

    return f"deployment #{flow_run.parameters.get('deployment_id')}"


def run_deployment(deployment_id: int) -> str:
    """Run the flow in this process (the CLI, a test): its final status."""
    return asyncio.run(deploy_release(deployment_id=deployment_id))


# async, though every step in it is sync: Prefect 3.8 ends a sync flow by joining a
# heartbeat thread (~0.9 s a run); an async flow does not wait for it
@flow(name="deploy_release", flow_run_name=flow_run_name, validate_parameters=False)
async def deploy_release(deployment_id: int) -> str:
    """Run recorded deployment `deployment_id` to its end; returns its final status."""
    from orchestrator.preparation import runner
    from orchestrator.settings import get_settings

    run = DeploymentRun(int(deployment_id), get_settings(), progress=say)
    run.record.add_evidence(runner=runner())  # this process runs it now
    install_stop_handlers(run.stop, run.progress)
    try:
        if not preflight(run):
            status: str = Status.REFUSED
        else:
            status = run_waves(run)
    except Exception as exc:  # noqa: BLE001 - never leave hosts half-way: back out, then tell
        status = run.abort(exc, crashlog.write(exc))
    finally:
        run.close()
        run.record.add_evidence(logins=run.sessions.logins)
    publish(run, status)
    return str(status)


def run_waves(run: DeploymentRun) -> str:
    for index in range(1, len(run.rollout.waves) + 1):
        if run.stop.is_set():
            return back_out(run, "interrupted by a signal before the next wave")
        try:
            verdict = run_wave.with_options(name=f"wave-{index}")(run, index)
        except AuthorizationRefused as exc:  # e.g. the window closed: stop at this boundary
            run.progress(f"the change gate refused wave {index}: {exc.message}")
            return run.halt(exc)
        if not verdict["passed"]:
            return back_out(run, f"milestone {index} failed: {verdict['reason']}")
    return finalize(run)


def publish(run: DeploymentRun, status: str) -> None:
    from orchestrator.cms import deployments
    from orchestrator.report import deployment_report

    rec = deployments.load(run.url, run.id)
    report = deployment_report(rec, deployments.journal_rows(run.url, run.id))
    rows = []
    for i, wave in enumerate(report["waves"], start=1):
        for host in wave:
            h = report["hosts"][host]
            rows.append(
                {
                    "wave": i,
                    "host": host,
                    "status": h["status"],
                    "release": h["release"],
                    "failure": (h.get("failure") or {}).get("reason", ""),
                }
            )
    key = f"deployment-{report['id']}"
    create_table_artifact(table=rows, key=key, description=f"{report['release']}: {status}")
    lines = [f"# Deployment {report['id']}: {status}", ""]
    lines += [
        f"- milestone {m['wave']}: {'passed' if m['passed'] else 'FAILED'}: {m['reason']}"
        for m in report["milestones"]
    ]
    create_markdown_artifact(markdown="\n".join(lines), key=f"{key}-summary")
