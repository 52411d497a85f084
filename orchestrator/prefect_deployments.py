"""Ferry's flows as Prefect deployments on a work pool, so Prefect's own workers run them.

`register(pool)` makes the pool (process type) if it is missing and one Prefect deployment
per flow on it, named `<flow>/<pool>`; `prefect worker start --pool POOL`, on this machine
or another, then runs them. Entrypoints are module paths (`orchestrator.flows.…`): a worker
imports the Ferry installed beside it, so no source is copied or pulled. Nothing secret is
put in a deployment (Prefect shows job variables in its UI): the worker's own environment
names the CMS (FERRY_HOME or FERRY_DATABASE_URL) and the DML, and the process worker passes
it to every flow run it starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEFAULT_POOL = "ferry"


@dataclass(frozen=True)
class FlowEntry:
    flow: str  # the Prefect flow's name
    entrypoint: str
    what: str


FLOWS = (
    FlowEntry("deploy_release", "orchestrator.flows.deploy_release",
              "run a recorded deployment (what `ferry deploy --via prefect` submits)"),
    FlowEntry("deploy_shard", "orchestrator.flows.deploy_shard",
              "a share of one wave's hosts (a run on this pool submits its waves' shards)"),
    FlowEntry("deploy_request", "orchestrator.flows.deploy_request",
              "plan, release and RFC in; the change gate decides (for the Prefect UI)"),
    FlowEntry("back_out_deployment", "orchestrator.flows.back_out_deployment",
              "manual backout of a deployment under its RFC(s)"),
    FlowEntry("recover_deployment", "orchestrator.flows.recover_deployment",
              "finish an interrupted deployment"),
)  # fmt: skip


def cms_name(cms_url: str) -> str:
    """A short name for a Ferry CMS: a hash of its URL without credentials (a team's shared
    PostgreSQL gives one name; two Ferry homes, two names)."""
    import hashlib

    from sqlalchemy.engine import make_url

    safe = make_url(cms_url).set(password=None).render_as_string(hide_password=False)
    return hashlib.sha256(safe.encode()).hexdigest()[:10]


def cms_tag(cms_url: str) -> str:
    """The flow-run tag naming the CMS whose deployment a run is."""
    return f"cms:{cms_name(cms_url)}"


def deployment_name(flow: str, pool: str) -> str:
    return f"{flow}/{pool}"


def register(pool: str = DEFAULT_POOL, working_dir: str | None = None) -> list[dict[str, Any]]:
    """Create the work pool if missing and (re)create Ferry's deployments on it; idempotent.

    `working_dir` is where a worker runs the flows: the Ferry project directory, so relative
    paths (a plan's templates, deploy_plans/change_models.yaml) mean what they mean here;
    a worker on another machine needs the project at the same path."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    made = []
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
            pool_new = False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            pool_new = True
        for entry in FLOWS:
            fl = load_flow_from_entrypoint(entry.entrypoint, use_placeholder_flow=False)
            flow_id = client.create_flow_from_name(fl.name)
            dep_id = client.create_deployment(
                flow_id=flow_id,
                name=pool,
                entrypoint=entry.entrypoint,
                work_pool_name=pool,
                description=entry.what,
                parameter_openapi_schema=parameter_schema(fl.fn).model_dump(),
                enforce_parameter_schema=True,
                tags=["ferry"],
                pull_steps=[],
                job_variables={"working_dir": working_dir} if working_dir else {},
            )
            made.append(
                {
                    "deployment": deployment_name(fl.name, pool),
                    "id": str(dep_id),
                    "what": entry.what,
                }
            )
    return [{"pool": pool, "pool_created": pool_new, **m} for m in made]


def require(pool: str = DEFAULT_POOL) -> None:
    """Before anything is recorded: the pool's deploy deployment exists (exit 2 if not)."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from orchestrator.errors import BadInput

    name = deployment_name("deploy_release", pool)
    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            raise BadInput(
                f"--pool {pool}: no Prefect deployment {name!r} on {_api()}: run `ferry "
                f"prefect register --pool {pool}` once and start a worker with `prefect "
                f"worker start --pool {pool}`"
            ) from None


def submit(deployment_id: int, pool: str = DEFAULT_POOL) -> Any:
    """Put recorded deployment `deployment_id` on the pool's queue; returns the flow run."""
    from prefect.deployments import run_deployment

    name = deployment_name("deploy_release", pool)
    return run_deployment(name=name, parameters={"deployment_id": deployment_id}, timeout=0)


# The last line a deployment flow logs. A run's log reaches Prefect in batches, and the
# last batch after the run is already Completed (its process sends it as it exits: in one CI
# run, after every other line of the run), so `follow` relays until it sees this line.
RUN_LOG_END = "this run's log ends here"
LOG_PAGE = 200  # log lines a read asks for (the most Prefect's server gives at once)


def follow(
    flow_run_id: Any, progress: Any, poll: float = 1.0, waiting_note: float = 20.0,
    log_end_wait: float = 15.0,
) -> Any:  # fmt: skip
    """Relay the flow run's log lines to `progress` until it ends; returns its final state.

    The worker writes the record; this only watches. A run nobody picks up gets one note
    after `waiting_note` seconds (no worker polls the pool) and is waited for. After the
    run's end, its log is relayed until its RUN_LOG_END line, or for `log_end_wait` seconds
    (a run whose process died never logs it)."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    seen = 0
    started = time.monotonic()
    noted = False
    logged = False  # the run's RUN_LOG_END line was read: its log is whole
    ended: tuple[Any, float] | None = None  # the final state, and when it was seen
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            logs = []
            if not logged:
                logs = client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                    sort=LogSort.TIMESTAMP_ASC,
                    offset=seen,
                    limit=LOG_PAGE,
                )
            for entry in logs:
                if entry.message.endswith(RUN_LOG_END):
                    logged = True
                    break
                progress(entry.message)
            seen += len(logs)
            state = run.state
            final = state is not None and state.is_final()
            if final and logged:
                return state
            if final and ended is None:
                ended = (state, time.monotonic())
            if ended is not None and time.monotonic() - ended[1] > log_end_wait:
                return ended[0]  # a run whose process died never logs its last line
            if len(logs) == LOG_PAGE:
                continue  # more is waiting: read on at once
            if not noted and state is not None and state.is_scheduled():
                if time.monotonic() - started > waiting_note:
                    progress(f"flow run {run.name} is waiting for a worker on its work pool")
                    noted = True
            # the marker may come a moment before the run's Completed: poll the state briskly
            time.sleep(min(poll, 0.5) if logged or ended is not None else poll)


def _api() -> str:
    import os

    return os.environ.get("PREFECT_API_URL", "the embedded Prefect server")


def resume_paused(deployment_id: int, decision: dict[str, Any]) -> str:
    """Resume the paused flow run of deployment `deployment_id` with a person's decision."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
        FlowRunFilterTags,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    from orchestrator.errors import BadInput
    from orchestrator.settings import get_settings

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(like_=f"#{deployment_id}"),
                tags=FlowRunFilterTags(all_=[cms_tag(get_settings().cms_url)]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
            )
        )
    runs = [r for r in runs if r.name.endswith(f" #{deployment_id}")]
    if not runs:
        raise BadInput(f"deployment {deployment_id}: no paused flow run on {_api()}")
    resume_flow_run(runs[0].id, run_input=decision)
    return runs[0].name
