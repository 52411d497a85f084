"""Prefect flows: `deploy_release(deployment_id)` runs a recorded deployment.

The flow's one parameter is the deployment id, a plain value: everything else — the
rollout with every rendered command, the hosts and how to reach them, the RFC — is loaded
from the CMS, and the package from the DML, so the same flow runs in this process (the
embedded default) or on a Prefect worker on another machine. One task per stage and per
wave (not per host: Prefect costs 20–160 ms per task here, and its embedded mode drops task
records at exit, so Ferry's own journal lives in the CMS). The flow holds no business
rules; it sequences DeploymentRun's methods and publishes a result artifact.

What Prefect shows is the outcome, not merely that the code returned: the flow run ends
Completed only when the deployment succeeded, Failed (with the failed milestone and the
hosts in its message) when it was backed out, refused, halted or failed, Crashed when an
internal error aborted it; a wave whose milestone failed and an incomplete backout are
Failed task runs. The run is named for what runs (`shop@1.4.0 → production #42`), tagged
with release, environment, RFC and change model, and its log holds Ferry's progress lines
with secret values redacted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import acreate_markdown_artifact, acreate_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.input import RunInput

from orchestrator import crashlog, zygote
from orchestrator.deployment import DeploymentRun
from orchestrator.errors import AuthorizationRefused
from orchestrator.lifecycle import Status


class RunLog:
    """Progress for people: stderr (so `--output json` stays parseable on stdout) and, once
    a flow run is under way, that run's log in Prefect, with secret var values redacted."""

    def __init__(self) -> None:
        self.logger: Any = None
        self.secrets: tuple[str, ...] = ()

    def attach(self, secrets: tuple[str, ...]) -> None:
        from prefect import get_run_logger

        self.secrets = secrets
        self.logger = get_run_logger()
        # Prefect's own loggers stay at WARNING (quiet); the run's log keeps Ferry's lines
        logging.getLogger("prefect.flow_runs").setLevel(logging.INFO)

    def __call__(self, message: str) -> None:
        from orchestrator.rollout import redact

        message = redact(message, self.secrets)
        print(message, file=sys.stderr, flush=True)
        if self.logger is not None:
            self.logger.info(message)

    def end(self, message: str) -> None:
        """The run log's last line, in Prefect only: `ferry deploy --via prefect` relays the
        log until it sees it (orchestrator.prefect_deployments.follow)."""
        from orchestrator.prefect_deployments import RUN_LOG_END

        if self.logger is not None:
            self.logger.info(f"{message}; {RUN_LOG_END}")


def install_stop_handlers(stop: threading.Event, progress: Any, deployment: int) -> None:
    """SIGINT/SIGTERM: stop at the next safe point and back out; a second one aborts at
    once: the process ends there (exit 130), its ssh clients see their input close and end
    the hosts' sessions, and the journal, written before every step, tells `ferry
    remediate recover` what to put back. (Raising in the main thread would wait for every
    host's transfer in flight to end first: the pool's threads are joined.)"""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, _frame: Any) -> None:
        if stop.is_set():  # straight to fd 2: no lock the interrupted code may hold
            said = (
                f"received {signal.Signals(signum).name} again: aborting now, hosts may be "
                f"half-way (a hook in flight runs to its end or timeout, holding its host);"
                f" `ferry remediate recover {deployment}` puts them back\n"
            )
            try:
                os.write(2, ("\x1b[?25h" if os.isatty(2) else "").encode() + said.encode())
            except OSError:  # (the terminal gone): the exit code still says it
                pass
            zygote.abort(130)  # a warm child tells its caller the code first
        stop.set()
        progress(
            f"received {signal.Signals(signum).name}: stopping at the next safe point, then "
            "backing out (send it again to abort at once; `ferry remediate recover` finishes)"
        )

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


class MilestoneNotMet(Exception):
    """Ends a wave's task run Failed; the flow catches it and backs out."""

    def __init__(self, verdict: dict[str, Any]) -> None:
        super().__init__(f"milestone {verdict['wave']} failed: {verdict['reason']}")
        self.verdict = verdict


class AcceptanceNotMet(MilestoneNotMet):
    """Ends the acceptance task run Failed; backed out like a failed milestone."""

    def __init__(self, verdict: dict[str, Any]) -> None:
        Exception.__init__(self, verdict["reason"])
        self.verdict = verdict


class BackoutNotComplete(Exception):
    """Ends the backout's task run Failed: some host was not restored."""


# Tasks take the run object (a live handle inside this flow run); the flow's own parameter
# stays a plain deployment id.
@task(name="preflight", cache_policy=NO_CACHE)
def preflight(run: DeploymentRun) -> bool:
    """Authorize the deployment and check the release in; nothing has touched a host yet.
    Once authorized, what wave 1's hosts will lack is framed while the rest gets ready."""
    if not run.start():
        return False
    run.frame_ahead(1)
    return True


@task(name="wave", cache_policy=NO_CACHE)
def run_wave(run: DeploymentRun, index: int) -> dict[str, Any]:
    if index > 1:  # wave 1's hosts were authorized by preflight a moment ago, with all others
        run.gate_wave(index)
    verdict = run.run_wave(index, shards_for(run, index)).to_dict()
    if not verdict["passed"]:
        raise MilestoneNotMet({**verdict, "wave": index})
    return verdict


@task(name="acceptance", cache_policy=NO_CACHE)
def accept(run: DeploymentRun, index: int) -> dict[str, Any]:
    """The plan's acceptance tests after a passed milestone (the pilot's, the last)."""
    verdict = run.accept(index).to_dict()
    if not verdict["passed"]:
        raise AcceptanceNotMet(verdict)
    return verdict


@task(name="backout", cache_policy=NO_CACHE)
def back_out(run: DeploymentRun, reason: str) -> str:
    status = run.fail(run.last_verdict, reason)
    if status == Status.FAILED:
        raise BackoutNotComplete(f"{reason}; the backout left hosts needing remediation")
    return status


@task(name="finalize", cache_policy=NO_CACHE)
def finalize(run: DeploymentRun) -> str:
    return run.succeed()


def flow_run_name() -> str:
    """`shop@1.4.0 → production #42`: what runs, where, which record."""
    from prefect.runtime import flow_run

    from orchestrator.cms import deployments
    from orchestrator.settings import get_settings

    deployment_id = flow_run.parameters.get("deployment_id")
    try:
        rec = deployments.load(get_settings().cms_url, deployment_id, rollout=False)
    except Exception:  # noqa: BLE001 - a name must never stop a run; the flow reports it
        return f"deployment #{deployment_id}"
    return f"{rec.release} → {rec.environment} #{rec.id}"


def run_deployment(deployment_id: int) -> str:
    """Run the flow in this process (the CLI, a test): its final status, from the CMS."""
    from orchestrator.cms import deployments
    from orchestrator.settings import get_settings

    # the run's one sync Prefect client, made before the flow starts: the engine's setup
    # looks up the server's default result storage twice, each time through a client of
    # its own when none is current, and each client loads the CA bundle (~20–60 ms here)
    with one_sync_client():
        asyncio.run(deploy_release(deployment_id=deployment_id, return_state=True))
    return deployments.load(get_settings().cms_url, deployment_id, rollout=False).status


# async, though every step in it is sync: Prefect 3.8 ends a sync flow by joining a
# heartbeat thread (~0.9 s a run); an async flow does not wait for it
@flow(name="deploy_release", flow_run_name=flow_run_name, validate_parameters=False)
async def deploy_release(deployment_id: int) -> Any:
    """Run recorded deployment `deployment_id` to its end; its final state is the outcome."""
    from orchestrator.preparation import runner
    from orchestrator.settings import get_settings

    log = RunLog()
    run = DeploymentRun(int(deployment_id), get_settings(), progress=log)
    log.attach(run.rollout.secrets)
    await _tag(run)
    run.record.add_evidence(runner=runner())  # this process runs it now
    install_stop_handlers(run.stop, run.progress, run.id)
    try:
        with one_sync_client():
            if not preflight(run):
                status: str = Status.REFUSED
            else:
                status = await run_waves(run)
    except Exception as exc:  # noqa: BLE001 - never leave hosts half-way: back out, then tell
        status = run.abort(exc, crashlog.write(exc))
    finally:
        run.close()
        run.record.add_evidence(logins=run.sessions.logins)
    report = await publish(run, status)
    log.end(f"deployment {deployment_id}: {status}")
    return final_state(str(status), report)


def one_sync_client() -> Any:
    """One Prefect API client for every task run of this flow run: without it each task
    run opens its own, and each client builds a TLS context from the CA bundle (~50 ms
    here) even for a plain-HTTP server."""
    from prefect.context import SyncClientContext

    return SyncClientContext.get_or_create()


async def run_waves(run: DeploymentRun) -> str:
    for index, wave in enumerate(run.rollout.waves, start=1):
        if run.stop.is_set():
            return _back_out(run, "interrupted by a signal before the next wave")
        try:
            run_wave.with_options(name=f"wave-{index}")(run, index)
            if run.acceptance_due(index):  # evidence before any person's approval
                accept.with_options(name=f"acceptance-{index}")(run, index)
        except AuthorizationRefused as exc:  # e.g. the window closed: stop at this boundary
            run.progress(f"the change gate refused wave {index}: {exc.message}")
            return run.halt(exc)
        except MilestoneNotMet as exc:  # an acceptance test's failure too
            return _back_out(run, str(exc))
        if wave.approve is not None:
            rejected = await manual_milestone(run, index, wave.approve)
            if rejected:
                return _back_out(run, rejected)
    return finalize(run)


class WaveDecision(RunInput):
    """What a person gives to resume a paused wave (Prefect's UI shows these fields)."""

    approve: bool
    approver: str
    comment: str = ""


async def manual_milestone(run: DeploymentRun, index: int, timeout: float) -> str | None:
    """Pause after wave `index` until an allowed person decides; the rejection's reason, or
    None when approved. A decision by someone not allowed is recorded and waited past."""
    from prefect.flow_runs import pause_flow_run

    from orchestrator.change.config import load_change_models
    from orchestrator.milestone import approver_refused

    roles = {k: [str(r) for r in v] for k, v in load_change_models().roles.items()}
    run.record.add_evidence(awaiting_approval={"wave": index, "timeout_s": timeout})
    run.progress(
        f"  wave {index} awaits a manual milestone: `ferry approve {run.id}` (or "
        f"--reject), or resume the flow run in Prefect's UI; {int(timeout)} s at most"
    )
    attempt = 0
    while True:
        attempt += 1
        try:
            decision = await pause_flow_run(
                wait_for_input=WaveDecision, timeout=int(timeout), key=f"wave-{index}-{attempt}"
            )
        except Exception as exc:  # noqa: BLE001 - Prefect's timeout, or the server gone
            run.record.add_evidence(awaiting_approval=None)
            return f"manual milestone {index}: no decision ({type(exc).__name__}: {exc})"
        why = approver_refused(decision.approver, run.actor, roles)
        entry = {"approve": decision.approve, "approver": decision.approver,
                 "comment": decision.comment}  # fmt: skip
        if why is not None:
            run.record.decide(index, {**entry, "refused": why})
            run.progress(f"  decision not counted: {why}; still waiting")
            continue
        run.record.decide(index, entry)
        run.record.add_evidence(awaiting_approval=None)
        word = "approved" if decision.approve else "rejected"
        run.progress(f"  manual milestone {index} {word} by {decision.approver}")
        if decision.approve:
            return None
        return f"manual milestone {index} rejected by {decision.approver}: {decision.comment}"


# -- waves sharded across workers ----------------------------------------------------------
SHARD_GRACE = 30.0  # beyond the milestone's deadline, for a shard's flow run to start and end


def shards_for(run: DeploymentRun, index: int) -> Any:
    """How wave `index` runs: None (here, whole) or a callable running it as shard flow runs
    on this run's work pool. Only a run that a worker took from a pool shards: its pool's
    `deploy_shard` deployment is there, and so are the other workers."""
    from prefect.runtime import deployment

    size = run.rollout.shard_size
    wave = run.rollout.waves[index - 1]
    if not size or len(wave.hosts) <= size:
        return None
    if deployment.id is None:
        run.progress(
            f"  wave {index}: shard_size {size} applies on a Prefect work pool (ferry deploy "
            "--via prefect); this run is local, so the wave runs whole here"
        )
        return None
    pool = str(deployment.name)  # Ferry names its deployments on a pool after the pool

    def run_shards(w: Any) -> None:
        from concurrent.futures import ThreadPoolExecutor

        parts = [w.names[i : i + size] for i in range(0, len(w.names), size)]
        run.progress(f"  wave {index}: {len(parts)} shards of at most {size} hosts on {pool}")
        wait = run.rollout.milestone.deadline + SHARD_GRACE
        # its own event loop in a thread: this task runs inside the flow's loop
        with ThreadPoolExecutor(1) as thread:
            ends = thread.submit(asyncio.run, _shards(run.id, index, parts, pool, wait)).result()
        for k, end in enumerate(ends, start=1):
            run.progress(f"  wave {index} shard {k}/{len(parts)}: {end}")

    return run_shards


async def _shards(
    deployment_id: int, index: int, parts: list[list[str]], pool: str, wait: float
) -> list[str]:
    """Submit the shards one by one, then watch them all until they end or `wait` passes;
    one still unfinished then (its worker died, or none was free) is cancelled, so that
    nothing deploys behind the backout that follows. Returns a line per shard."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.deployments import arun_deployment
    from prefect.states import Cancelling

    runs = []
    for hosts in parts:
        params = {"deployment_id": deployment_id, "wave": index, "hosts": hosts}
        runs.append(
            await _retrying(
                lambda p=params: arun_deployment(
                    name=f"deploy_shard/{pool}", parameters=p, timeout=0, as_subflow=False
                )
            )
        )
    ends: dict[Any, str] = {}
    deadline = time.monotonic() + wait
    async with get_client() as client:
        while len(ends) < len(runs) and time.monotonic() < deadline:
            await asyncio.sleep(1)
            for fr in runs:
                if fr.id in ends:
                    continue
                now = await _retrying(lambda i=fr.id: client.read_flow_run(i))
                if now.state is not None and now.state.is_final():
                    ends[fr.id] = f"flow run {now.name} {now.state.type.value.lower()}"
        late = [fr for fr in runs if fr.id not in ends]
        for fr in late:
            await _retrying(lambda i=fr.id: client.set_flow_run_state(i, Cancelling(), force=True))
            ends[fr.id] = f"flow run {fr.name} did not end within {int(wait)} s: cancelled"
        # a live worker ends a cancelled run's process within moments; a dead one's is gone
        until = time.monotonic() + SHARD_GRACE
        while late and time.monotonic() < until:
            await asyncio.sleep(1)
            states = [await _retrying(lambda i=fr.id: client.read_flow_run(i)) for fr in late]
            late = [fr for fr, now in zip(late, states, strict=True) if not now.state.is_final()]
    return [ends[fr.id] for fr in runs]


async def _retrying(call: Any, attempts: int = 6) -> Any:
    """A busy Prefect server answers 503 (its SQLite, under load): try again, backing off."""
    from prefect.exceptions import PrefectHTTPStatusError

    for attempt in range(1, attempts + 1):
        try:
            return await call()
        except PrefectHTTPStatusError as exc:
            if exc.response.status_code < 500 or attempt == attempts:
                raise
            await asyncio.sleep(min(8.0, 0.5 * 2**attempt))
    raise AssertionError("unreachable")


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).isoformat()


def shard_run_name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"deployment #{p.get('deployment_id')} wave {p.get('wave')} shard"


@flow(name="deploy_shard", flow_run_name=shard_run_name, validate_parameters=False)
async def deploy_shard(deployment_id: int, wave: int, hosts: list[str]) -> Any:
    """A share of one wave's hosts, on whichever worker takes it: deploy, check, record each
    host's outcome. The run that sharded the wave judges its milestone and backs out."""
    from prefect.states import Completed, Failed

    from orchestrator.preparation import runner
    from orchestrator.settings import get_settings

    log = RunLog()
    run = DeploymentRun(int(deployment_id), get_settings(), progress=log)
    log.attach(run.rollout.secrets)
    began = {"wave": int(wave), "hosts": list(hosts), "runner": runner()}
    run.record.append_evidence("shards", [{**began, "event": "started", "at": _now()}])
    try:
        outcomes = run.run_shard(int(wave), list(hosts))
    finally:
        run.close()
    run.record.append_evidence("shards", [{**began, "event": "ended", "at": _now()}])
    bad = [o.host for o in outcomes if not o.ok]
    if bad:
        return Failed(message=f"{len(bad)} of {len(outcomes)} host(s) failed: {', '.join(bad[:8])}")
    return Completed(message=f"{len(outcomes)} host(s) deployed")


def _back_out(run: DeploymentRun, reason: str) -> str:
    try:
        return back_out(run, reason)
    except BackoutNotComplete:
        return run.status


async def _tag(run: DeploymentRun) -> None:
    """Tags for Prefect's filters; set from the record so a worker's run gets them too."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    from orchestrator.prefect_deployments import cms_tag

    # cms:… tells apart deployment #N of two Ferry homes that share one Prefect server
    tags = [
        f"release:{run.rollout.release}",
        f"environment:{run.rollout.environment}",
        cms_tag(run.url),
    ]
    if run.rfc_id is not None:
        tags += [f"rfc:{run.rfc_id}", f"model:{_change_model(run)}"]
    async with get_client() as client:
        await client.update_flow_run(flow_run.id, tags=sorted({*flow_run.tags, *tags}))


def _change_model(run: DeploymentRun) -> str:
    from orchestrator.cms.db import session_scope
    from orchestrator.cms.models import RFC

    with session_scope(run.url) as s:
        rfc = s.get(RFC, run.rfc_id)
        return rfc.model if rfc is not None else "unknown"


def final_state(status: str, report: dict[str, Any]) -> Any:
    """The flow run's final state for a deployment's final status (pure but for Prefect's
    state constructors): Completed only for a success."""
    from prefect.states import Completed, Crashed, Failed

    message = outcome_message(status, report)
    if status == Status.SUCCEEDED:
        return Completed(message=message, data=status)
    if status == Status.ABORTED:
        return Crashed(message=message, data=status)
    return Failed(message=message, data=status)


def outcome_message(status: str, report: dict[str, Any]) -> str:
    """One line for the Prefect UI: what happened, the failed milestone, the hosts."""
    head = f"{report['release']} → {report['environment']}: {status}"
    failed = [m for m in report.get("milestones", []) if not m["passed"]]
    parts = [head]
    if failed:
        parts.append(f"milestone {failed[0]['wave']} failed: {failed[0]['reason']}")
    for state in ("failed", "backed-out", "needs-remediation"):
        names = sorted(h for h, v in report["hosts"].items() if v["status"] == state)
        if names:
            shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
            parts.append(f"{state}: {shown}")
    why = report.get("message") or report.get("reason")
    if not failed and why and status != Status.SUCCEEDED:
        parts.append(str(why))
    return "; ".join(parts)


def artifact_key(cms_url: str, deployment_id: int) -> str:
    """Unique per Ferry CMS, so two Ferry homes on one Prefect server never collide
    (Prefect keys allow lowercase letters, digits and dashes only)."""
    from orchestrator.prefect_deployments import cms_name

    return f"ferry-{cms_name(cms_url)}-deployment-{deployment_id}"


async def publish(run: DeploymentRun, status: str) -> dict[str, Any]:
    # awaited: inside this async flow Prefect's sync artifact calls return an un-run coroutine
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
    key = artifact_key(run.url, report["id"])
    await acreate_table_artifact(table=rows, key=key, description=f"{report['release']}: {status}")
    lines = [f"# Deployment {report['id']}: {status}", ""]
    lines += [
        f"- milestone {m['wave']}: {'passed' if m['passed'] else 'FAILED'}: {m['reason']}"
        for m in report["milestones"]
    ]
    await acreate_markdown_artifact(markdown="\n".join(lines), key=f"{key}-summary")
    return report


# -- flows a Prefect worker runs for the UI and for remediation (prefect_deployments.py) --
@flow(name="deploy_request", validate_parameters=False)
async def deploy_request(plan: str, release: str, rfc: int | None = None) -> Any:
    """Plan, release and RFC in, as from the Prefect UI: prepared and recorded like
    `ferry deploy` (bad input refused before any record), then the change gate decides."""
    from prefect.states import Failed

    from orchestrator.errors import FerryError
    from orchestrator.preparation import DeployRequest, open_deployment, prepare
    from orchestrator.settings import get_settings

    settings = get_settings()
    request = DeployRequest(
        plan_path=Path(plan), release=release, rfc=None if rfc is None else str(rfc),
        actor=settings.actor, inventory=None,
    )  # fmt: skip
    from orchestrator.cms.locks import HostLocks

    try:
        prepared = prepare(request, settings)
    except FerryError as exc:
        return Failed(message=f"refused before any record: {exc}")
    # one run per host, as `ferry deploy`: locked before the record, released at the end
    locks = HostLocks(
        settings.cms_url, [h.host for h in prepared.rollout.hosts()], purpose="deploy",
        actor=settings.actor, release=prepared.rollout.release,
    )  # fmt: skip
    try:
        locks.acquire()
        record = open_deployment(prepared, settings)
        locks.bind(record.id)
        return await deploy_release(deployment_id=record.id, return_state=True)
    except FerryError as exc:
        return Failed(message=f"refused before any record: {exc}")
    finally:
        locks.release()


@flow(name="back_out_deployment", flow_run_name="backout of deployment #{deployment_id}")
async def back_out_deployment(deployment_id: int, rfcs: list[str], keep_data: bool = False) -> Any:
    """`ferry remediate backout` on a worker: every touched host to its own prior baseline."""
    from orchestrator.settings import get_settings
    from remediation.backout import BackoutRequest, back_out

    settings = get_settings()
    log = RunLog()
    log.attach(())
    req = BackoutRequest(str(deployment_id), list(rfcs), settings.actor, None, keep_data)
    return _remediation_state(
        f"backout of deployment {deployment_id}", back_out(req, settings, log)
    )


@flow(name="recover_deployment", flow_run_name="recover of deployment #{deployment_id}")
async def recover_deployment(deployment_id: int) -> Any:
    """`ferry remediate recover` on a worker: finish an interrupted deployment."""
    from orchestrator.settings import get_settings
    from remediation.recover import RecoverRequest, recover

    settings = get_settings()
    log = RunLog()
    log.attach(())
    outcome = recover(RecoverRequest(str(deployment_id), settings.actor), settings, log)
    return _remediation_state(f"recover of deployment {deployment_id}", outcome)


def _remediation_state(what: str, outcome: Any) -> Any:
    from prefect.states import Completed, Failed

    message = f"{what}: {outcome.data.get('status', '')} (exit {outcome.exit_code})"
    stuck = outcome.data.get("needs_remediation") or []
    if stuck:
        message += f"; needs remediation: {', '.join(map(str, stuck[:8]))}"
    if outcome.exit_code == 0:
        return Completed(message=message, data=outcome.data)
    return Failed(message=message, data=outcome.data)
