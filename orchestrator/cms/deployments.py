"""The one writer of deployment records: the deployment, its waves, the host-step journal,
the baselines and the host CIs (a test fails if another module writes these tables).

A live run, a manual backout and `recover` all write through `DeploymentRecord`; status,
reports and remediation read `load()`'s detached `RecordedDeployment`. Every status move is
checked against `orchestrator.lifecycle`. The journal row of a host step is written before
the step acts (`begin`) and after (`end`), so a crash at any point leaves `started` rows
that `ferry remediate recover` reads back.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.orm import defer

from orchestrator import crashpoints, lifecycle
from orchestrator.cms import audit
from orchestrator.cms.db import session_scope
from orchestrator.cms.models import (
    Deployment,
    EnvironmentBaseline,
    HostBaseline,
    HostStep,
    Wave,
    utcnow,
)
from orchestrator.cms.models import Host as HostCI
from orchestrator.errors import BadInput, NotFound
from orchestrator.rollout import Baseline, Rollout, release_id


@dataclass(frozen=True)
class RecordedDeployment:
    """A detached copy of one deployment row and its waves (safe after the session closed)."""

    id: int
    status: str
    release: str
    digest: str
    environment: str
    strategy: str
    method: str
    plan_file: str
    rfc_id: int | None
    rollout: dict[str, Any] | None  # None: loaded without it (load(..., rollout=False))
    evidence: dict[str, Any]
    actor: str
    started_at: datetime
    finished_at: datetime | None
    waves: tuple[dict[str, Any], ...] = field(default=())

    @property
    def release_id(self) -> str:
        return release_id(self.release, self.digest)

    @property
    def open(self) -> bool:
        """Never finished: running now, or interrupted (see remediation's `runner_alive`)."""
        return self.finished_at is None and self.status in lifecycle.OPEN

    @property
    def hosts(self) -> list[str]:
        return [h for wave in self.recorded_rollout().get("waves", []) for h in wave]

    @property
    def wave_status(self) -> dict[int, str]:
        return {w["index"]: w["status"] for w in self.waves}

    def latest(self, key: str) -> dict[str, dict[str, Any]]:
        """host → its last entry in an evidence list (`outcomes`, `backout`): later wins."""
        return {item["host"]: item for item in self.evidence.get(key, [])}

    def plan(self) -> Rollout:
        """The recorded Rollout: hosts, how to reach them, every rendered command."""
        return Rollout.from_record(self.recorded_rollout(), where=f"deployment {self.id}")

    def recorded_rollout(self) -> dict[str, Any]:
        """The rollout as recorded (a dict); raises if this copy was loaded without it."""
        if self.rollout is None:
            raise RuntimeError(f"deployment {self.id} was loaded without its rollout")
        return self.rollout


def parse_deployment_id(value: str | int) -> int:
    text = str(value).strip().removeprefix("#")
    if not text.isdigit():
        raise BadInput(f"DEPLOYMENT_ID: {value!r} is not a deployment id (a number, e.g. 7)")
    return int(text)


def detach(dep: Deployment, *, rollout: bool = True) -> RecordedDeployment:
    return RecordedDeployment(
        id=dep.id,
        status=dep.status,
        release=dep.release,
        digest=dep.package_digest,
        environment=dep.environment,
        strategy=dep.strategy,
        method=dep.method,
        plan_file=dep.plan_file,
        rfc_id=dep.rfc_id,
        rollout=dict(dep.rollout or {}) if rollout else None,
        evidence=dict(dep.evidence or {}),
        actor=dep.actor,
        started_at=dep.started_at,
        finished_at=dep.finished_at,
        waves=tuple(
            {
                "index": w.index,
                "hosts": list(w.hosts),
                "status": w.status,
                "verdict": dict(w.verdict or {}),
                "started_at": w.started_at,
                "finished_at": w.finished_at,
            }
            for w in sorted(dep.waves, key=lambda w: w.index)
        ),
    )


def load(url: str, deployment_id: str | int, *, rollout: bool = True) -> RecordedDeployment:
    """One deployment as recorded; `rollout=False` leaves out its rollout (every host's
    actions and rendered commands: ~1.7 KB a host, ~11 ms to decode at 200 hosts), for the
    many reads during a run that want only its status, evidence or waves."""
    did = parse_deployment_id(deployment_id)
    with session_scope(url) as s:
        dep = s.get(Deployment, did, options=() if rollout else (defer(Deployment.rollout),))
        if dep is None:
            raise NotFound(
                f"deployment {did} does not exist (`ferry status` lists recent deployments)"
            )
        return detach(dep, rollout=rollout)


def recent(url: str, limit: int, environment: str | None = None) -> list[RecordedDeployment]:
    with session_scope(url) as s:
        q = select(Deployment).order_by(Deployment.id.desc()).limit(limit)
        if environment:
            q = q.where(Deployment.environment == environment)
        return [detach(d) for d in s.scalars(q)]


def backouts_of(url: str, deployment_id: int) -> list[int]:
    """The manual backouts recorded against a deployment, oldest first."""
    with session_scope(url) as s:
        rows = s.scalars(
            select(Deployment).where(Deployment.strategy == "backout").order_by(Deployment.id)
        )
        return [r.id for r in rows if (r.evidence or {}).get("backs_out") == deployment_id]


def steps_by_host(url: str, deployment_id: int) -> dict[str, dict[str, str]]:
    """host → {step: last status} for a deployment (`started` means it may have run)."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    with session_scope(url) as s:
        rows = s.scalars(
            select(HostStep).where(HostStep.deployment_id == deployment_id).order_by(HostStep.id)
        )
        for row in rows:
            out[row.host][row.step] = row.status
    return dict(out)


def journal_rows(url: str, deployment_id: int) -> list[dict[str, Any]]:
    with session_scope(url) as s:
        rows = s.scalars(
            select(HostStep).where(HostStep.deployment_id == deployment_id).order_by(HostStep.id)
        )
        return [
            {
                "host": r.host,
                "wave": r.wave_index,
                "step": r.step,
                "status": r.status,
                "detail": dict(r.detail or {}),
                "started_at": r.started_at,
                "finished_at": r.finished_at,
            }
            for r in rows
        ]


def host_baselines(url: str, names: list[str] | None = None) -> dict[str, Baseline]:
    with session_scope(url) as s:
        rows = (
            s.scalars(select(HostBaseline))
            if names is None
            else _named(s, HostBaseline.host, names)
        )
        return {r.host: Baseline(r.release, r.package_digest) for r in rows}


def open_among(session: Any, ids: list[int]) -> set[int]:
    """Which of these deployments are still open (never finished), inside the caller's
    transaction (the host locks decide with it whether a dead holder needs recovering)."""
    if not ids:
        return set()
    rows = session.execute(
        select(Deployment.id, Deployment.status, Deployment.finished_at).where(
            Deployment.id.in_(ids)
        )
    )
    return {i for i, st, fin in rows if fin is None and st in lifecycle.OPEN}


def deploy_roots(url: str, names: list[str]) -> dict[str, str]:
    """The deploy root each host CI was last deployed under (plan overrides included)."""
    with session_scope(url) as s:
        return {r.name: r.deploy_root for r in _named(s, HostCI.name, names) if r.deploy_root}


@dataclass
class _Write:
    """One journal write waiting for the group commit: a step's row (`begin`: `values`) or
    its outcome (`end`: `step_id`, `values`, `detail` merged into the row's own)."""

    kind: str
    values: dict[str, Any]
    step_id: int = 0
    detail: dict[str, Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class _GroupCommit:
    """Journal writes of many hosts at once share one transaction (group commit).

    A caller's write is durable when its call returns — the journal row of a step is
    committed before the step acts — but the hosts of a wave that write at the same
    moment pay for one commit together instead of one each, and for one statement per
    kind of write: the commit thread competes for the GIL with every host's thread, and
    each statement hands the GIL over and waits to get it back (with a savepoint and a
    read per write, 200 hosts' rows took up to 3 s to commit)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._queue: queue.SimpleQueue[_Write] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, item: _Write) -> Any:
        self._queue.put(item)
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True)
                self._thread.start()
        item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    def _run(self) -> None:
        while True:
            try:
                items = [self._queue.get(timeout=0.5)]
            except queue.Empty:
                with self._lock:
                    if self._queue.empty():
                        self._thread = None
                        return
                continue
            while len(items) < 500:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                try:
                    with session_scope(self.url) as s:
                        _write_together(s, items)
                except Exception:  # noqa: BLE001 - find the bad write: one at a time
                    for item in items:
                        item.result = item.error = None
                    with session_scope(self.url) as s:
                        for item in items:
                            try:
                                with s.begin_nested():  # one bad write fails only its caller
                                    _write_together(s, [item])
                            except Exception as exc:  # noqa: BLE001 - handed to its caller
                                item.error = exc
            except Exception as exc:  # noqa: BLE001 - the commit itself failed: tell everyone
                for item in items:
                    item.error = item.error or exc
            for item in items:
                item.done.set()


def _write_together(s: Any, items: list[_Write]) -> None:
    """`items` in one INSERT … RETURNING and one UPDATE per set of columns (executemany)."""
    table = HostStep.__table__
    begins = [i for i in items if i.kind == "begin"]
    if begins:
        stmt = insert(table).returning(table.c.id, sort_by_parameter_order=True)
        ids = s.execute(stmt, [i.values for i in begins]).scalars().all()
        for item, step_id in zip(begins, ids, strict=True):
            item.result = int(step_id)
    ends = [i for i in items if i.kind == "end"]
    if not ends:
        return
    # the row's own detail (begin's, or a crash point's step name) in one read for all
    want = [i.step_id for i in ends if i.detail or crashpoints.ARMED]
    rows = {}
    if want:
        q = select(table.c.id, table.c.step, table.c.detail).where(table.c.id.in_(want))
        rows = {r.id: r for r in s.execute(q)}
    by_columns: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
    for item in ends:
        values = dict(item.values)
        row = rows.get(item.step_id)
        if item.detail:
            values["detail"] = {**((row.detail if row is not None else None) or {}), **item.detail}
        item.result = row.step if row is not None else ""
        by_columns[tuple(sorted(values))].append({"b_id": item.step_id, **values})
    for columns, params in by_columns.items():
        stmt = (
            update(table)
            .where(table.c.id == bindparam("b_id"))
            .values({c: bindparam(c) for c in columns})
        )
        s.execute(stmt, params)


class DeploymentRecord:
    """Writes one deployment's records; each method is one transaction (journal writes of
    concurrent hosts share one, see _GroupCommit)."""

    def __init__(self, url: str, deployment_id: int, actor: str) -> None:
        self.url = url
        self.id = deployment_id
        self.actor = actor
        self._lock = threading.Lock()  # SQLite serialises writers anyway; this keeps it orderly
        self._journal = _GroupCommit(url)

    # -- opening ---------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        url: str,
        rollout: Rollout,
        *,
        actor: str,
        rfc_id: int | None,
        evidence: dict[str, Any],
        groups: dict[str, list[str]] | None = None,
        strategy: str | None = None,
        audit_action: str = "deploy.planned",
        audit_data: dict[str, Any] | None = None,
    ) -> tuple[DeploymentRecord, Rollout]:
        """Record a planned deployment; returns it and the rollout bound to its id."""
        with session_scope(url) as s:
            dep = Deployment(
                rfc_id=rfc_id,
                release=rollout.release,
                package_digest=rollout.digest,
                environment=rollout.environment,
                plan_file=rollout.plan_file,
                strategy=strategy or rollout.strategy,
                method=rollout.method,
                status=lifecycle.Status.PLANNED,
                rollout={},
                evidence=evidence,
                actor=actor,
            )
            s.add(dep)
            s.flush()
            bound = rollout.bind(dep.id)
            dep.rollout = bound.to_record()
            for i, wave in enumerate(bound.waves, start=1):
                s.add(Wave(deployment_id=dep.id, index=i, hosts=wave.names))
            if groups is not None:
                _upsert_hosts(s, bound, groups)
            audit.append(
                s,
                actor=actor,
                action=audit_action,
                subject_type="deployment",
                subject_id=dep.id,
                data=audit_data or {"release": rollout.release, "rfc": rfc_id},
            )
            return cls(url, dep.id, actor), bound

    def load(self, *, rollout: bool = False) -> RecordedDeployment:
        """The record as it stands; without its rollout unless asked (the run holds it)."""
        return load(self.url, self.id, rollout=rollout)

    # -- status ----------------------------------------------------------------------------
    def move(
        self,
        to: lifecycle.Status,
        *,
        evidence: dict[str, Any] | None = None,
        audit_data: dict[str, Any] | None = None,
        audit_action: str | None = None,
    ) -> None:
        """Move the deployment on (checked by the lifecycle); a final status finishes it
        and is audited, with the evidence merged into the record."""
        with self._lock, session_scope(self.url) as s:
            dep = _locked(s, self.id)
            assert dep is not None
            lifecycle.check_move(self.id, dep.status, to)
            dep.status = to
            if evidence:
                dep.evidence = {**(dep.evidence or {}), **evidence}
            if lifecycle.is_final(to):
                dep.finished_at = dep.finished_at or utcnow()
                for w in dep.waves:
                    if w.status == lifecycle.WaveStatus.RUNNING:
                        w.status, w.finished_at = lifecycle.WaveStatus.INTERRUPTED, utcnow()
            if lifecycle.is_final(to) or audit_action:
                audit.append(
                    s,
                    actor=self.actor,
                    action=audit_action or f"deploy.{to}",
                    subject_type="deployment",
                    subject_id=self.id,
                    data={"release": dep.release, "rfc": dep.rfc_id, **(audit_data or {})},
                )

    def add_evidence(self, **evidence: Any) -> None:
        with self._lock, session_scope(self.url) as s:
            dep = _locked(s, self.id)
            assert dep is not None
            dep.evidence = {**(dep.evidence or {}), **evidence}

    def append_evidence(self, key: str, items: list[Any]) -> None:
        """Add to a list in the evidence (host outcomes, backout results) without losing any."""
        with self._lock, session_scope(self.url) as s:
            dep = _locked(s, self.id)
            assert dep is not None
            ev = dict(dep.evidence or {})
            ev[key] = list(ev.get(key, [])) + list(items)
            dep.evidence = ev

    def decide(self, wave: int, decision: dict[str, Any]) -> None:
        """A person's decision at a manual milestone: in the evidence and the audit log, by
        them (approve or reject; a decision refused for its approver is recorded too)."""
        word = "approved" if decision.get("approve") else "rejected"
        if decision.get("refused"):
            word = "decision-refused"
        with self._lock, session_scope(self.url) as s:
            dep = _locked(s, self.id)
            assert dep is not None
            ev = dict(dep.evidence or {})
            ev["approvals"] = [*ev.get("approvals", []), {"wave": wave, **decision}]
            dep.evidence = ev
            audit.append(
                s,
                actor=str(decision.get("approver") or "unknown"),
                action=f"deploy.wave-{word}",
                subject_type="deployment",
                subject_id=self.id,
                data={"wave": wave, **decision},
            )

    # -- early life support ----------------------------------------------------------------
    def els_run(self, run: dict[str, Any], until: str) -> None:
        """One early-life-support check run, kept in the deployment's `els` evidence; a run
        with failed hosts is audited (`els.failed`)."""
        with self._lock, session_scope(self.url) as s:
            dep = _locked(s, self.id)  # evidence is read, changed and written back
            ev = dict(dep.evidence or {})
            els = dict(ev.get("els") or {})
            els["until"] = until
            els["runs"] = [*els.get("runs", []), run]
            ev["els"] = els
            dep.evidence = ev
            if run.get("failed"):
                audit.append(
                    s,
                    actor=self.actor,
                    action="els.failed",
                    subject_type="deployment",
                    subject_id=self.id,
                    data={"release": dep.release, "rfc": dep.rfc_id, "failed": run["failed"]},
                )

    def els_close(self, outcome: dict[str, Any], until: str) -> None:
        """The end of early life support: its outcome on the deployment, audited."""
        with self._lock, session_scope(self.url) as s:
            dep = _locked(s, self.id)
            ev = dict(dep.evidence or {})
            ev["els"] = {**dict(ev.get("els") or {}), "until": until, "outcome": outcome}
            dep.evidence = ev
            audit.append(
                s,
                actor=self.actor,
                action="els.closed",
                subject_type="deployment",
                subject_id=self.id,
                data={"release": dep.release, "rfc": dep.rfc_id, **outcome},
            )

    # -- waves -----------------------------------------------------------------------------
    def wave(
        self,
        index: int,
        status: lifecycle.WaveStatus,
        verdict: dict[str, Any] | None = None,
    ) -> None:
        with self._lock, session_scope(self.url) as s:
            w = s.scalar(select(Wave).where(Wave.deployment_id == self.id, Wave.index == index))
            assert w is not None
            w.status = status
            if status == lifecycle.WaveStatus.RUNNING:
                w.started_at = utcnow()
            if verdict is not None:
                w.verdict, w.finished_at = verdict, utcnow()

    # -- the journal -----------------------------------------------------------------------
    def begin(self, wave: int, host: str, step: str, detail: dict[str, Any] | None = None) -> int:
        """The step's row, committed before it acts; returns its id for `end`."""
        values = {
            "deployment_id": self.id, "wave_index": wave, "host": host, "step": step,
            "status": "started", "detail": detail or {}, "started_at": utcnow(),
        }  # fmt: skip
        step_id = int(self._journal.submit(_Write("begin", values)))
        crashpoints.reached(step, "begin")
        return step_id

    def end(self, step_id: int, status: str, detail: dict[str, Any] | None = None) -> None:
        values = {"status": status, "finished_at": utcnow()}
        step = self._journal.submit(_Write("end", values, step_id, detail))
        crashpoints.reached(step, "end")

    def steps_by_host(self) -> dict[str, dict[str, str]]:
        return steps_by_host(self.url, self.id)

    # -- baselines -------------------------------------------------------------------------
    def set_baselines(
        self,
        environment: str,
        hosts: dict[str, Baseline | None],
        *,
        environment_baseline: Baseline | None = None,
        only_if_environment_was: int | None = None,
    ) -> None:
        """Each host's baseline (None: the host runs nothing of ours any more); the
        environment's too when given (with `only_if_environment_was`: only when the
        environment's baseline was recorded by that deployment)."""
        with self._lock, session_scope(self.url) as s:
            # one query for the rows there are (not a get and a merge per host: at 200
            # hosts that was ~5 s of CPU at the end of every deployment)
            rows = {r.host: r for r in _named(s, HostBaseline.host, list(hosts))}
            now = utcnow()
            for host, baseline in hosts.items():
                row = rows.get(host)
                if baseline is None:
                    if row is not None:
                        s.delete(row)
                    continue
                if row is None:
                    row = HostBaseline(host=host)
                    s.add(row)
                row.environment, row.release = environment, baseline.release
                row.package_digest, row.deployment_id = baseline.digest, self.id
                row.recorded_at = now
            if environment_baseline is not None:
                env = s.get(EnvironmentBaseline, environment)
                if only_if_environment_was is not None and (
                    env is None or env.deployment_id != only_if_environment_was
                ):
                    return
                env = env or EnvironmentBaseline(environment=environment)
                env.release, env.package_digest = (
                    environment_baseline.release,
                    environment_baseline.digest,
                )
                env.deployment_id, env.recorded_at = self.id, utcnow()
                s.merge(env)


def _locked(s: Any, deployment_id: int) -> Deployment:
    """The deployment row, locked until the transaction ends: its evidence is read, changed
    and written back, and shard runs on several workers write it at once (PostgreSQL's read
    committed would otherwise let one of two such writes overwrite the other). Its rollout,
    written once when the deployment is recorded, is left out: decoding it took ~11 ms at
    200 hosts on every status move and wave's outcomes."""
    dep = s.get(
        Deployment,
        deployment_id,
        with_for_update=True,
        populate_existing=True,
        options=(defer(Deployment.rollout),),
    )
    assert dep is not None
    return dep


def _named(s: Any, key: Any, names: list[str]) -> list[Any]:
    """The rows of `key`'s table whose `key` is one of `names`: one query per 500 names
    (under SQLite's bound-parameter limit, 999 before 3.32), not one per name."""
    rows: list[Any] = []
    for i in range(0, len(names), 500):
        rows += s.scalars(select(key.class_).where(key.in_(names[i : i + 500])))
    return rows


def _upsert_hosts(s: Any, rollout: Rollout, groups: dict[str, list[str]]) -> None:
    """Each target host's CI: the rows there are in one query per 500 names, not one query
    (and one autoflush) per host: opening the record of a 1000-host deployment took
    0.6-0.73 s of CPU that way, 0.16-0.3 s now (SQLite, dev measurement)."""
    actions = rollout.hosts()
    rows = {r.name: r for r in _named(s, HostCI.name, [a.host for a in actions])}
    for action in actions:
        ci = rows.get(action.host)
        if ci is None:
            ci = rows[action.host] = HostCI(
                name=action.host, address=action.address, deploy_root=""
            )
            s.add(ci)
        ci.address = action.address
        ci.environment = rollout.environment
        ci.deploy_root = action.deploy_root
        ci.groups = list(groups.get(action.host, ()))
