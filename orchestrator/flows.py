"""Prefect flows: `deploy_release` runs a DeploymentRun's steps as tasks you see in the UI.

One task per stage and per wave (not per host: Prefect costs 20–160 ms per task here, and
its embedded mode drops task records at exit, so Ferry's own journal lives in the CMS).
The flow holds no business rules; it sequences DeploymentRun's methods and publishes a
result artifact (a table per wave: host, steps, checks, time).
"""

from __future__ import annotations

import signal
import threading
import uuid
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from orchestrator.deployment import DeploymentRun
from orchestrator.errors import AuthorizationRefused

_RUNS: dict[str, DeploymentRun] = {}  # flow parameters must be plain values: pass a token


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


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(token: str) -> int:
    """Record the deployment, authorize it, check the release in."""
    return _RUNS[token].open()


@task(name="wave", cache_policy=NO_CACHE)
def run_wave(token: str, index: int) -> dict[str, Any]:
    run = _RUNS[token]
    run.gate_wave(index)
    return run.run_wave(index).to_dict()


@task(name="backout", cache_policy=NO_CACHE)
def back_out(token: str, reason: str) -> str:
    run = _RUNS[token]
    return run.fail(run.verdicts[-1] if run.verdicts else None, reason)


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(token: str) -> None:
    _RUNS[token].succeed()


@flow(name="deploy_release", log_prints=False, validate_parameters=False)
def deploy_release(token: str, release: str, plan: str, rfc: str | None) -> str:
    """Deploy `release` by `plan` under `rfc`; returns the deployment's final status."""
    run = _RUNS[token]
    install_stop_handlers(run.stop, run.progress)
    preflight(token)
    try:
        status = run_waves(token, run)
    except Exception as exc:  # noqa: BLE001 - never leave hosts half-way: back out, then tell
        run.progress(f"unexpected error during the rollout: {exc}; backing out")
        status = back_out(token, f"internal error: {type(exc).__name__}: {exc}")
    publish(run, status)
    return status


def run_waves(token: str, run: DeploymentRun) -> str:
    for index in range(1, len(run.rollout.waves) + 1):
        if run.stop.is_set():
            return back_out(token, "interrupted by a signal before the next wave")
        try:
            verdict = run_wave.with_options(name=f"wave-{index}")(token, index)
        except AuthorizationRefused as exc:  # e.g. the window closed: stop at this boundary
            run.progress(f"the change gate refused wave {index}: {exc.message}")
            run.halt(exc)
            return "refused"
        if not verdict["passed"]:
            return back_out(token, f"milestone {index} failed: {verdict['reason']}")
    finalize(token)
    return "succeeded"


def publish(run: DeploymentRun, status: str) -> None:
    report = run.report(status)
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


def run_deploy_flow(run: DeploymentRun) -> str:
    token = uuid.uuid4().hex
    _RUNS[token] = run
    try:
        return deploy_release(
            token=token, release=run.req.release, plan=str(run.req.plan_path), rfc=run.req.rfc
        )
    finally:
        _RUNS.pop(token, None)
        run.close()
