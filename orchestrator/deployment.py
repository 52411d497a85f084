"""One deployment's run, from its record to its end (Orchestrate layer).

`DeploymentRun` is built from a deployment id alone: the recorded Rollout (hosts, how to
reach them, every rendered command), the package from the DML by digest, the RFC. It moves
the deployment through `orchestrator.lifecycle` and writes only through the deployment
record; the Prefect flow calls its methods and holds no rules of its own.

    start        gate (RFC, approvals, window, blackout, promotion rule) → check-in → RFC
                 implementing
    run_wave     gate again → stage … check on the wave's hosts → milestone verdict
    accept       after the pilot's and the last milestone: the plan's acceptance tests,
                 recorded as evidence on the release; a failure backs out like a milestone
    succeed      prune + read-back every host → baselines → RFC implemented
    fail         back out every touched host → backed-out | integrity-failed | failed
    halt         the gate refused a later wave: earlier waves stay, RFC failed
    abort        an unexpected error: back out first, crash log, aborted (exit 1)

What an unreachable host means, step by step: during a wave it is a failed host (the
milestone's tolerance decides); during a backout it needs remediation (exit 5); at the
final prune, after every milestone passed, the deployment still succeeds, with a warning,
its baseline recorded and the host flagged for remediation (it is not read back).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from orchestrator import catalog
from orchestrator.acceptance import acceptance_verdict, run_acceptance
from orchestrator.backout import backout_actions
from orchestrator.backout_runner import BackoutResult, BackoutRunner
from orchestrator.change import gate
from orchestrator.change import lifecycle as rfc_lifecycle
from orchestrator.change.promotion import PILOT
from orchestrator.cms import deployments, evidence
from orchestrator.cms.db import session_scope
from orchestrator.cms.deployments import DeploymentRecord
from orchestrator.cms.models import RFC, utcnow
from orchestrator.errors import AuthorizationRefused, FerryError, IntegrityError
from orchestrator.executor import Executor
from orchestrator.lifecycle import RFC_AFTER, Status, WaveStatus
from orchestrator.milestone import HostOutcome, Verdict, milestone_verdict
from orchestrator.objects import ObjectCache
from orchestrator.rollout import Baseline, WavePlan, redact
from orchestrator.sessions import HostSessions
from orchestrator.settings import Settings

Progress = Callable[[str], None]
Shards = Callable[[WavePlan], None]  # runs a wave's shards elsewhere; they record outcomes


def _outcome_from(d: dict[str, Any]) -> HostOutcome:
    return HostOutcome(
        d["host"], bool(d["ok"]), d.get("failed_step"), d.get("reason", ""),
        d.get("output", ""), kind=d.get("kind"),
    )  # fmt: skip


class DeploymentRun:
    def __init__(
        self,
        deployment_id: int,
        settings: Settings,
        progress: Progress,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.url = settings.cms_url
        rec = deployments.load(self.url, deployment_id)
        self.id = rec.id
        self.rfc_id = rec.rfc_id
        self.actor = rec.actor
        self.rollout = rec.plan()
        self.record = DeploymentRecord(self.url, rec.id, rec.actor)
        self.progress = progress
        self.stop = stop or threading.Event()
        self.sessions = HostSessions(self.rollout)
        self._executor: Executor | None = None
        self._dml: Any = None
        self._priors: dict[str, frozenset[str] | None] = {}
        self.done_waves: list[int] = []
        self.last_verdict: Verdict | None = None
        self.pull: Any = None
        if self.rollout.method == "pull":  # the agents pull; waves wait for their reports
            from orchestrator.pull import PullDriver

            self.pull = PullDriver(
                self.url, self.id, self.rollout, self.record, progress, self.stop
            )
        from orchestrator.notify import Notifier

        self.notifier = Notifier(
            rec.evidence.get("notify"),
            {
                "deployment": rec.id,
                "release": self.rollout.release,
                "environment": self.rollout.environment,
                "rfc": rec.rfc_id,
                "ci": rec.evidence.get("ci"),
            },
            progress,
        )

    @property
    def status(self) -> str:
        return self.record.load().status

    # -- the package and the executor (opened on first use) --------------------------------
    def _open_dml(self) -> Any:
        if self._dml is None:
            from dml.store import DML

            self._dml = DML.from_settings()
        return self._dml

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            dml = self._open_dml()
            package = dml.open(self.rollout.release)  # signature + every checksum
            if package.digest != self.rollout.digest:
                raise IntegrityError(
                    f"deployment {self.id}: the DML's {self.rollout.release} is "
                    f"{package.digest}, the record says {self.rollout.digest}"
                )
            self._executor = Executor(
                rollout=self.rollout,
                sessions=self.sessions,
                record=self.record,
                package=package,
                public_key_hex=dml.public_key_bytes().hex(),
                rotations=dml.rotations(),
                signature=dml.signature_for_hosts(package),
                # per process: shard runs of one deployment on one machine each extract,
                # frame and remove their own copy (a shared one raced on its temp files)
                objects=ObjectCache(
                    package,
                    self.settings.home / "cache" / f"deployment-{self.id}-{os.getpid()}",
                    store=dml.objects_dir,
                ),
                prior_objects=self._prior_objects,
                progress=self.progress,
                stop=self.stop,
            )
        return self._executor

    def _prior_objects(self, prior: Baseline) -> frozenset[str] | None:
        """The objects of a host's prior release, from its signed manifest in the DML (a
        guess of what the host holds: its own NEED decides); None when the DML lacks it."""
        if prior.release not in self._priors:
            try:
                package = self._open_dml().open(prior.release, verify_archive=False)
                same = package.digest == prior.digest
                known = frozenset(f.sha256 for f in package.files) if same else None
            except FerryError:
                known = None
            self._priors[prior.release] = known
        return self._priors[prior.release]

    # -- start -----------------------------------------------------------------------------
    def start(self) -> bool:
        """Authorize, check the release in, RFC implementing; False when the gate refused."""
        ro = self.rollout
        try:
            if self.rfc_id is None:
                raise AuthorizationRefused(
                    "no RFC given: every deployment needs an authorized change (--rfc ID)",
                    reasons=["no RFC"],
                )
            # a pilot wave runs first and is judged before wave 2's gate asks for it
            self._gate([h.host for h in ro.hosts()], deferred=(PILOT,) if ro.pilot else ())
            with session_scope(self.url) as s:
                catalog.checkin(s, ro.release, self.rfc_id, self.actor, dml=self._open_dml())
                rfc_lifecycle.transition(
                    s, self.rfc_id, "implementing", actor=self.actor, data={"deployment": self.id}
                )
        except AuthorizationRefused as exc:
            self.record.move(
                Status.REFUSED, evidence={"reasons": exc.reasons, "message": exc.message}
            )
            self.notifier.tell("finish", f"refused: {exc.message}", status=Status.REFUSED)
            return False
        self.record.move(Status.RUNNING)
        self.notifier.tell(
            "start",
            f"started: {len(ro.hosts())} host(s) in {len(ro.waves)} wave(s)",
            status=Status.RUNNING,
        )
        return True

    def _gate(self, hosts: list[str], deferred: tuple[str, ...] = ()) -> None:
        with session_scope(self.url) as s:
            gate.require(
                s,
                rfc_id=self.rfc_id,
                stage="deploy",
                release=self.rollout.release,
                environment=self.rollout.environment,
                hosts=hosts,
                now=utcnow(),
                actor=self.actor,
                digest=self.rollout.digest,
                deferred=deferred,
            )

    # -- waves -----------------------------------------------------------------------------
    def gate_wave(self, index: int) -> None:
        """Before every wave: does the change authorization still hold (window, blackout)?"""
        self._gate(self.rollout.waves[index - 1].names)

    def frame_ahead(self, index: int) -> None:
        """Start framing what wave `index`'s hosts most likely lack (orchestrator.objects),
        when this process pushes to them: not for pull, nor for a wave shards may take."""
        wave = self.rollout.waves[index - 1]
        size = self.rollout.shard_size
        if self.pull is None and not (size and len(wave.hosts) > size):
            self.executor.frame_ahead(wave)

    def run_wave(self, index: int, shards: Shards | None = None) -> Verdict:
        """Deploy wave `index` (here, or as `shards` run elsewhere) and judge its milestone."""
        wave = self.rollout.waves[index - 1]
        start = time.monotonic()
        self.record.wave(index, WaveStatus.RUNNING)
        self.progress(
            f"wave {index}/{len(self.rollout.waves)}: {len(wave.hosts)} host(s): "
            f"{_names(wave.names)}"
        )
        last = index == len(self.rollout.waves)  # its sessions stay for the final prune
        if self.pull is not None:
            outcomes, elapsed = self.pull.run_wave(wave)
            self.record.append_evidence("outcomes", [o.to_dict() for o in outcomes])
            self._tell(outcomes, "reported deployed")
            return self._judge(index, outcomes, elapsed)
        if shards is None:
            outcomes = self._deploy(wave, keep_open=last)
            self.record.append_evidence("outcomes", [o.to_dict() for o in outcomes])
        else:
            outcomes = self._sharded(wave, shards)
        return self._judge(index, outcomes, time.monotonic() - start)

    def run_shard(self, index: int, names: list[str]) -> list[HostOutcome]:
        """One shard of wave `index`, on a worker: deploy and check these hosts, record each
        outcome; the wave's milestone is judged by the run that sharded it."""
        wave = self.rollout.waves[index - 1]
        chosen = set(names)
        part = replace(wave, hosts=tuple(a for a in wave.hosts if a.host in chosen))
        outcomes = self._deploy(part, keep_open=False)
        self.record.append_evidence("outcomes", [o.to_dict() for o in outcomes])
        return outcomes

    def _deploy(self, wave: WavePlan, keep_open: bool) -> list[HostOutcome]:
        executor = self.executor
        soak = self.rollout.milestone.soak
        outcomes = executor.run_wave(wave, check=soak == 0, keep_open=keep_open and soak == 0)
        self._tell(outcomes, "deployed")
        if soak > 0 and not self.stop.is_set():
            executor.soak(soak)
            outcomes = executor.run_checks(wave, outcomes)
            if not keep_open:
                for a in wave.hosts:
                    self.sessions.release(a.host)
        return outcomes

    def _sharded(self, wave: WavePlan, shards: Shards) -> list[HostOutcome]:
        """Run the shards (they record their hosts' outcomes), then read the outcomes back: a
        host whose shard ended without one (its worker died) failed, and is recorded so."""
        shards(wave)
        recorded = self.record.load().latest("outcomes")
        outcomes, missing = [], []
        for name in wave.names:
            o = recorded.get(name)
            if o is None:
                missing.append(
                    HostOutcome(
                        name, False, "shard",
                        "its shard ended without an outcome (the worker running it died or "
                        "timed out); `ferry remediate recover` settles the host",
                        kind="unreachable",
                    )
                )  # fmt: skip
                outcomes.append(missing[-1])
            else:
                outcomes.append(_outcome_from(o))
        if missing:
            self.record.append_evidence("outcomes", [o.to_dict() for o in missing])
        self._tell(outcomes, "deployed")
        return outcomes

    def _judge(self, index: int, outcomes: list[HostOutcome], elapsed: float) -> Verdict:
        verdict = milestone_verdict(
            index,
            outcomes,
            self.rollout.milestone,
            elapsed=elapsed,
            interrupted=self.stop.is_set(),
        )
        self.last_verdict = verdict
        status = WaveStatus.PASSED if verdict.passed else WaveStatus.FAILED
        self.record.wave(index, status, verdict.to_dict())
        if not verdict.passed and index == 1 and self.rollout.pilot and len(self.rollout.waves) > 1:
            with session_scope(self.url) as s:  # a failed pilot is evidence too
                evidence.record(s, [self._pilot_row(False, f"milestone 1: {verdict.reason}")])
        word = "passed" if verdict.passed else "FAILED"
        self.progress(f"  milestone {index} {word}: {verdict.reason}")
        self.notifier.tell(
            "milestone", f"milestone {index} {word}: {verdict.reason}", milestone=verdict.to_dict()
        )
        if verdict.passed:
            self.done_waves.append(index)
            tolerated = [o.host for o in outcomes if not o.ok]
            if tolerated:
                self.progress(f"  backing out tolerated failed host(s): {_names(tolerated)}")
                self.back_out(only=tolerated)
        return verdict

    # -- acceptance tests ------------------------------------------------------------------
    def acceptance_due(self, index: int) -> bool:
        """After the pilot wave (its verdict is evidence even without tests) and the last."""
        ro = self.rollout
        last = index == len(ro.waves) and any(h.acceptance for h in ro.hosts())
        return last or (index == 1 and ro.pilot is not None and len(ro.waves) > 1)

    def accept(self, index: int) -> Verdict:
        """Run the acceptance tests on the healthy hosts done so far (the pilot's: wave 1's),
        record every result as evidence on the release for this environment."""
        ro = self.rollout
        pilot = index == 1 and ro.pilot is not None and len(ro.waves) > 1
        outcomes = self._outcomes()
        waves = ro.waves[:1] if pilot else ro.waves[:index]
        hosts = [a for w in waves for a in w.hosts if outcomes.get(a.host, {}).get("ok")]
        if any(a.acceptance for a in hosts):
            self.progress(
                f"  acceptance tests{' of the pilot' if pilot else ''} on {len(hosts)} host(s)"
            )
        results = run_acceptance(self.sessions, hosts, ro.concurrency)
        verdict = acceptance_verdict(index, results)
        items = [redact(r.to_dict(), ro.secrets) for r in results]
        self.record.append_evidence("acceptance", [{**i, "wave": index} for i in items])
        base = {
            "release": ro.release,
            "digest": ro.digest,
            "environment": ro.environment,
            "deployment_id": self.id,
            "scope": "pilot" if pilot else "deployment",
            "actor": self.actor,
        }
        rows = [
            {
                **base,
                "kind": evidence.ACCEPTANCE,
                "name": i["name"],
                "type": i["type"],
                "host": i["host"],
                "passed": i["passed"],
                "output": i["output"],
                "duration_ms": int(r.duration * 1000),
            }
            for i, r in zip(items, results, strict=True)
        ]
        if pilot:
            rows.append(self._pilot_row(verdict.passed, f"milestone 1 passed; {verdict.reason}"))
        with session_scope(self.url) as s:
            evidence.record(s, rows)
        if results:
            word = "passed" if verdict.passed else "FAILED"
            self.progress(f"  acceptance {word}: {verdict.reason}")
        if not verdict.passed:
            self.last_verdict = verdict
        return verdict

    def _pilot_row(self, passed: bool, output: str) -> dict[str, Any]:
        ro = self.rollout
        return {
            "release": ro.release,
            "digest": ro.digest,
            "environment": ro.environment,
            "deployment_id": self.id,
            "scope": "pilot",
            "actor": self.actor,
            "kind": evidence.PILOT,
            "name": ro.pilot,
            "passed": passed,
            "output": output,
        }

    def _tell(self, outcomes: list[HostOutcome], word: str) -> None:
        bad = [o for o in outcomes if not o.ok]
        self.progress(
            f"  {len(outcomes) - len(bad)}/{len(outcomes)} {word}"
            + "".join(f"\n  ✗ {o.host}: {o.failed_step}: {o.reason}" for o in bad[:10])
        )

    # -- backout ---------------------------------------------------------------------------
    def back_out(self, only: list[str] | None = None) -> list[BackoutResult]:
        """Return every touched host (or `only` these) to its own prior baseline; what was
        touched is read from the journal, the one holder of each host's step state."""
        journal = self.record.steps_by_host()
        restored = {
            r["host"] for r in self.record.load().evidence.get("backout", []) if r.get("restored")
        }
        hosts = [h for h in (only or list(journal)) if h in journal and h not in restored]
        priors = {h: self.rollout.host(h).prior for h in hosts}
        actions = backout_actions({h: journal[h] for h in hosts}, priors)
        needed = [a for a in actions if a.needed]
        if only is None:
            untouched = len(actions) - len(needed)
            self.progress(
                f"backing out {len(needed)} host(s) to their prior baselines"
                + (f" ({untouched} never switched)" if untouched else "")
            )
        if self.pull is not None:
            results = self.pull.back_out(needed, everyone=only is None)
        else:
            runner = BackoutRunner(self.rollout, self.sessions, self.record, self.progress)
            results = runner.run(needed)
        if results:
            self.record.append_evidence("backout", [r.to_dict() for r in results])
        return results

    def _stuck(self) -> list[dict[str, Any]]:
        """The hosts the backout could not restore, each with its prior release (what the
        RFC of a manual backout must be for: `remediation.decisions.backout_next_step`)."""
        prior = {a.host: a.prior.release if a.prior else None for a in self.rollout.hosts()}
        return [
            {"host": h, "current": r.get("current"), "error": r.get("error"), "prior": prior.get(h)}
            for h, r in self.record.load().latest("backout").items()
            if not r.get("restored")
        ]

    # -- the ends --------------------------------------------------------------------------
    def succeed(self) -> Status:
        """Read every host back before declaring success; then record the new baselines."""
        ro = self.rollout
        outcomes = self._outcomes()
        ok_hosts = [a for a in ro.hosts() if outcomes.get(a.host, {}).get("ok")]
        if self.pull is not None:  # what each agent read back at the end of its steps
            current = self.pull.current(ok_hosts)
        else:
            current = self.executor.prune(ok_hosts)  # retention, and `current` read back
        flagged: list[dict[str, Any]] = []
        for host, got in current.items():
            if isinstance(got, Exception):
                why = f"not read back after its milestone passed: {got}"
                self.progress(f"  warning: {host}: {why}")
                flagged.append({"host": host, "current": None, "error": why})
            elif got != ro.release_id:
                why = f"read back on {got or 'no release'}, not {ro.release_id}"
                self.progress(f"  warning: {host}: {why}")
                flagged.append({"host": host, "current": got, "error": why})
        wrong = {f["host"] for f in flagged if f["current"] is not None}
        new = Baseline(ro.release, ro.digest)
        on_new = {a.host: new for a in ok_hosts if a.host not in wrong}
        # a deployment narrowed by --hosts never speaks for the whole environment
        narrowed = bool(self.record.load().evidence.get("limit"))
        everyone = len(on_new) == len(ro.hosts()) and not narrowed
        self.record.set_baselines(
            ro.environment, on_new, environment_baseline=new if everyone else None
        )
        with session_scope(self.url) as s:
            catalog.mark_deployed(s, ro.release, ro.environment, actor=self.actor)
        self._rfc(Status.SUCCEEDED, "")
        self.record.move(
            Status.SUCCEEDED,
            evidence={
                "verdicts": [w["verdict"] for w in self.record.load().waves if w["verdict"]],
                "needs_remediation": flagged,
            },
            audit_data={"needs_remediation": [f["host"] for f in flagged]},
        )
        self.notifier.tell(
            "finish",
            f"succeeded on {len(on_new)} host(s)",
            status=Status.SUCCEEDED,
            needs_remediation=[f["host"] for f in flagged],
        )
        return Status.SUCCEEDED

    def fail(self, verdict: Verdict | None, reason: str) -> Status:
        """After a failed milestone (or a stop): back out, record the evidence, tell the RFC."""
        self.record.move(
            Status.BACKING_OUT,
            evidence={
                "reason": reason,
                "failed_milestone": verdict.to_dict() if verdict else None,
            },
        )
        self.notifier.tell("backout", f"backing out: {reason}", status=Status.BACKING_OUT)
        self.back_out()
        stuck = self._stuck()
        if stuck:
            status = Status.FAILED
        elif verdict is not None and verdict.integrity:
            status = Status.INTEGRITY_FAILED
        else:
            status = Status.BACKED_OUT
        if status == Status.INTEGRITY_FAILED and self._only_refused_the_key():
            # nothing was wrong with the change, only with a host's trust in the signer: the
            # RFC stays implementing, so the same RFC deploys again once the key is fixed
            self.progress(
                f"RFC-{self.rfc_id} stays usable: only the DML key was refused; fix it (the "
                "message names how) and deploy again under the same RFC"
            )
        else:
            self._rfc(status, reason)
        self.record.move(
            status,
            evidence={"needs_remediation": stuck},
            audit_data={"reason": reason, "stuck": [s["host"] for s in stuck]},
        )
        self.notifier.tell(
            "finish",
            f"{status}: {reason}",
            status=status,
            needs_remediation=[s["host"] for s in stuck],
        )
        return status

    def halt(self, exc: AuthorizationRefused) -> Status:
        """The gate refused a later wave: stop at this boundary; earlier waves stay."""
        ro = self.rollout
        outcomes = self._outcomes()
        done = {
            a.host: Baseline(ro.release, ro.digest)
            for i in self.done_waves
            for a in ro.waves[i - 1].hosts
            if outcomes.get(a.host, {}).get("ok")
        }
        self.record.set_baselines(ro.environment, done)
        before = len(self.done_waves) + 1
        note = f"halted before wave {before}: {exc.message}"
        self._rfc(Status.HALTED, note)
        self.record.move(
            Status.HALTED,
            evidence={"reasons": exc.reasons, "message": exc.message, "halted_before_wave": before},
        )
        self.notifier.tell("finish", f"halted: {note}", status=Status.HALTED)
        return Status.HALTED

    def abort(self, exc: BaseException, crash_log: str) -> Status:
        """An unexpected error: never leave hosts half-way. Back out, then end as aborted."""
        reason = f"internal error: {type(exc).__name__}: {exc}"
        self.progress(f"unexpected error during the rollout: {exc}; backing out")
        if self.record.load().status == Status.RUNNING:
            self.record.move(Status.BACKING_OUT, evidence={"reason": reason})
        if self.record.load().status == Status.BACKING_OUT:
            try:
                self.back_out()
            except Exception as again:  # noqa: BLE001 - record what we can; recover finishes
                self.progress(f"the backout failed too: {again}; run `ferry remediate recover`")
        stuck = self._stuck()
        self._rfc(Status.ABORTED, reason)
        self.record.move(
            Status.ABORTED,
            evidence={"reason": reason, "crash_log": crash_log, "needs_remediation": stuck},
        )
        self.notifier.tell("finish", f"aborted: {reason}", status=Status.ABORTED)
        return Status.ABORTED

    def _only_refused_the_key(self) -> bool:
        failed = [o for o in self._outcomes().values() if not o.get("ok")]
        return bool(failed) and all(
            o.get("kind") == "integrity"
            and o.get("failed_step") == "stage"
            and "pins DML key" in str(o.get("reason"))
            for o in failed
        )

    def _outcomes(self) -> dict[str, dict[str, Any]]:
        return self.record.load().latest("outcomes")

    def _rfc(self, status: Status, note: str) -> None:
        to = RFC_AFTER.get(status)
        if to is None or self.rfc_id is None:
            return
        with session_scope(self.url) as s:
            rfc = s.get(RFC, self.rfc_id)
            if rfc is None or rfc.status != "implementing":
                return
            rfc_lifecycle.transition(
                s, self.rfc_id, to, actor=self.actor, note=note, data={"deployment": self.id}
            )

    def close(self) -> None:
        self.sessions.close()
        if self._executor is not None:
            self._executor.objects.close()


def _names(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" … (+{len(names) - limit})" if len(names) > limit else "")
