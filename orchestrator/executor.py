"""The forward executor: runs a Rollout's waves on real hosts, journaling every step.

Hosts of a wave run in parallel up to the rollout's concurrency, each over its own session.
A host's failure is data (a HostOutcome), never an exception that stops the others; the
milestone decides. Each step runs exactly the commands the planner rendered for that host
(`HostAction.forward`), dispatched by the step table's names. A stop request
(SIGINT/SIGTERM) is honoured at the next safe point: between steps, never inside one
(every remote step has a timeout).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from orchestrator import steps as step_table
from orchestrator.backout import REFUSED
from orchestrator.cms.deployments import DeploymentRecord
from orchestrator.errors import FerryError, StepFailed, TransportError
from orchestrator.hostops import HostOps
from orchestrator.milestone import HostOutcome
from orchestrator.objects import ObjectCache, need_ahead
from orchestrator.progress import WaveProgress
from orchestrator.rollout import Baseline, HostAction, Rollout, StepCommand, WavePlan
from orchestrator.sessions import HostSessions

Progress = Callable[[str], None]


class Interrupted(FerryError):
    """The run was asked to stop (a signal) before a host's next step began."""

    def __init__(self, host: str, step: str) -> None:
        super().__init__(f"{host}: stopped before {step}")
        # printed after the host and the step ("h1: verify: …"): neither again
        self.problem = self.reason = "not begun: the run was asked to stop (a signal)"


class Executor:
    def __init__(
        self,
        *,
        rollout: Rollout,
        sessions: HostSessions,
        record: DeploymentRecord,
        package: Any,
        public_key_hex: str,
        objects: ObjectCache,
        rotations: list[dict[str, str]] | None = None,
        signature: bytes | None = None,
        prior_objects: Callable[[Baseline], frozenset[str] | None] | None = None,
        progress: Progress,
        stop: threading.Event,
    ) -> None:
        self.rollout = rollout
        self.sessions = sessions
        self.record = record
        self.package = package
        self.key_hex = public_key_hex
        # the signed rotations that lead a host pinning an older key to this one, and the
        # manifest's signature by this key (a release signed before a rotation is re-signed)
        self.rotations = list(rotations or [])
        self.signature = signature if signature is not None else package.signature
        self.objects = objects
        self.prior_objects = prior_objects  # a prior release's objects, None if unknown
        self.progress = progress
        self.stop = stop
        self.already: set[str] = set()  # hosts inspected intact in this very run
        self.current: set[str] = set()  # …and already running it, as the CMS records: no-ops
        self._wave_progress: WaveProgress | None = None  # the wave's, while one runs
        self._lock = threading.Lock()
        self._forward: dict[str, Callable[[HostOps, HostAction, StepCommand], dict[str, Any]]]
        self._forward = {
            "stage": self._stage,
            "verify": self._verify,
            "snapshot": self._hook_step("snapshot"),
            "install": self._install,
            "activate": self._activate,
            "check": self._hook_step("check"),
        }
        step_table.dispatch_table(self._forward, "forward")

    def _pool(self, n: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=max(1, min(self.rollout.concurrency, n)))

    # -- forward ---------------------------------------------------------------------------
    def run_wave(
        self, wave: WavePlan, *, check: bool = False, keep_open: bool = True
    ) -> list[HostOutcome]:
        """Every host's forward steps; with `check` (no soak), its milestone checks right
        after on the same session. Without `keep_open` each host's session ends when its
        work does, so sessions never outnumber the hosts being worked on. What the hosts most
        likely lack is framed ahead (unless preflight started it); a host that lacks
        something else has it framed when it asks (orchestrator.objects)."""
        progress = WaveProgress(f"wave {wave.index}", len(wave.hosts), self.progress)
        self._wave_progress = progress
        self.frame_ahead(wave)

        def one(a: HostAction) -> HostOutcome:
            outcome = self._deploy_host(wave.index, a)
            if check and not self.stop.is_set():
                outcome = self._check_host(a, outcome)
            if not keep_open or a.host in self.current or not outcome.ok:
                self.sessions.release(a.host)
            progress.host_done(a.host, outcome.ok)
            return outcome

        try:
            with self._pool(len(wave.hosts)) as pool:
                return list(pool.map(one, wave.hosts))
        finally:
            self._wave_progress = None
            progress.close()

    def _sent(self, n: int) -> None:
        """A host's session wrote `n` bytes of a transfer: the running wave's progress."""
        progress = self._wave_progress
        if progress is not None:
            progress.sending(n)

    def frame_ahead(self, wave: WavePlan) -> None:
        """Frame what the wave's hosts will most likely lack before they ask (~0.5 s of a
        20-host incremental release was its hosts waiting for that pass); once per run."""
        if self.prior_objects is None or self.objects.framing_ahead:
            return
        digest = self.rollout.digest
        moving = Counter(a.prior for a in wave.hosts if a.prior is None or a.prior.digest != digest)
        priors: Counter[frozenset[str] | None] = Counter()
        for prior, hosts in moving.items():
            priors[None if prior is None else self.prior_objects(prior)] += hosts
        if priors:
            self.objects.frame_ahead(need_ahead(self.objects.sizes, priors))

    def _deploy_host(self, wave: int, action: HostAction) -> HostOutcome:
        current, activated = "", False
        try:
            ops = self.sessions.ops(action)
            ops.session.on_sent = self._sent
            for step in action.steps:
                if action.host in self.current:
                    break  # the cheapest no-op: one login, one request (see _stage)
                current = step
                if self.stop.is_set():
                    raise Interrupted(action.host, step)
                if step == "activate":
                    activated = True  # started: `current` may have moved
                command = action.forward.get(step, StepCommand())
                sid = self.record.begin(wave, action.host, step)
                try:
                    detail = self._forward[step](ops, action, command) or {}
                except BaseException as exc:
                    # refused before it changed anything: another agent process was changing
                    # the host (its session holds the agent lock from its first change on,
                    # so only a step before that is refused): nothing to back out of it
                    busy = getattr(exc, "kind", None) == "busy"
                    self.record.end(sid, REFUSED if busy else "failed", {"error": str(exc)[-2000:]})
                    raise
                self.record.end(sid, "succeeded", detail)
            return HostOutcome(action.host, True, activated=activated)
        except (StepFailed, TransportError, Interrupted) as exc:
            return HostOutcome(
                action.host,
                False,
                current,
                # printed after the host and the step: "h1 at stage: disk full"
                exc.problem,
                getattr(exc, "output", ""),
                activated,
                kind=getattr(exc, "kind", None)
                or ("unreachable" if isinstance(exc, TransportError) else None),
            )

    def _stage(self, ops: HostOps, action: HostAction, _: StepCommand) -> dict[str, Any]:
        # one call: pin the key; a copy already on the host is trusted only once re-checked
        rid = self.rollout.release_id
        started = time.monotonic()
        info = ops.inspect(
            rid, self.key_hex, self.rollout.full_readback, self.rollout.digest, self.rotations
        )
        if info.get("pinned") == "rotated":
            self.progress(f"  {ops.name}: now pins DML key {self.key_hex[:8]}… (rotated)")
        inspected = time.monotonic() - started
        if info["have"]:
            # already running it, intact, and so recorded: nothing to send, verify, publish,
            # switch or hook; the milestone's own checks still run
            running = (
                info.get("current") == rid
                and action.prior is not None
                and action.prior.digest == self.rollout.digest
            )
            with self._lock:
                self.already.add(ops.name)
                if running and not self.rollout.containers:
                    self.current.add(ops.name)
            return {
                "bytes_sent": 0,
                "already": True,
                "already_current": running,
                "inspect_s": round(inspected, 3),
                **self._stage_images(ops),
            }
        if info["check"].get("set_aside"):
            self.progress(f"  {ops.name}: its copy of {rid} was altered; staging it afresh")
        result = ops.stage(
            rid, self.package.manifest_bytes, self.signature, self.objects.frames,
            _recorded(action),
        )  # fmt: skip
        result["inspect_s"] = round(inspected, 3)
        result["transfer_s"] = round(time.monotonic() - started - inspected, 3)
        result.update(self._stage_images(ops))
        return result

    def _stage_images(self, ops: HostOps) -> dict[str, Any]:
        """Image units: only the layers the host's engine lacks (orchestrator.containers)."""
        if not self.rollout.containers:
            return {}
        from orchestrator import containers

        return containers.stage(ops, self.rollout, self.package)

    def _verify(self, ops: HostOps, action: HostAction, _: StepCommand) -> dict[str, Any]:
        rid = self.rollout.release_id
        if ops.name in self.already:
            return {"release": rid, "already": True}
        return ops.verify(rid, _recorded(action))

    def _hook_step(self, step: str) -> Callable[[HostOps, HostAction, StepCommand], dict[str, Any]]:
        def run(ops: HostOps, action: HostAction, command: StepCommand) -> dict[str, Any]:
            return run_hook(ops, step, command.command, action.context)

        return run

    def _install(self, ops: HostOps, action: HostAction, command: StepCommand) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if command.config:
            detail["config"] = ops.write_config(self.rollout.release_id, dict(command.config))[
                "written"
            ]
        detail.update(run_hook(ops, "install", command.command, action.context))
        return detail

    def _activate(self, ops: HostOps, action: HostAction, command: StepCommand) -> dict[str, Any]:
        detail = ops.switch(self.rollout.release_id)
        if self.rollout.containers:
            from orchestrator import containers

            detail.update(containers.activate(ops, self.rollout))
        detail.update(run_hook(ops, "activate", command.command, action.context))
        return detail

    # -- milestone checks ------------------------------------------------------------------
    def run_checks(self, wave: WavePlan, outcomes: list[HostOutcome]) -> list[HostOutcome]:
        """After the soak: each healthy host's milestone checks and a read-back of its files."""
        by_host = {a.host: a for a in wave.hosts}
        if not outcomes:
            return []
        with self._pool(len(outcomes)) as pool:
            return list(pool.map(lambda o: self._check_host(by_host[o.host], o), outcomes))

    def _check_host(self, action: HostAction, o: HostOutcome) -> HostOutcome:
        """One healthy host: read its files back, then the milestone's checks."""
        if not o.ok:
            return o
        try:
            ops = self.sessions.ops(action)
            if o.host in self.current:  # `inspect` read it back a moment ago
                back: dict[str, Any] = {"ok": True}
            else:
                back = ops.readback(
                    self.rollout.release_id, self.rollout.full_readback, digest=self.rollout.digest
                )
            if not back.get("ok"):
                why = "; ".join(back["mismatches"][:3])
                return HostOutcome(o.host, False, "readback", why, "", True, "integrity")
            if self.rollout.containers:
                from orchestrator import containers

                ok, evidence = containers.health(ops, self.rollout)
                if not ok:
                    return HostOutcome(o.host, False, "milestone", evidence, "", True)
            for check in action.checks:
                ok, evidence = ops.check(check)
                if not ok:
                    return HostOutcome(o.host, False, "milestone", check.label, evidence, True)
        except (StepFailed, TransportError) as exc:
            return HostOutcome(
                o.host, False, "milestone", exc.problem, getattr(exc, "output", ""), True
            )
        return o

    def soak(self, seconds: float) -> None:
        if seconds > 0:
            self.progress(f"  soaking {seconds:.0f}s before the milestone checks")
            self.stop.wait(seconds)

    # -- the end ---------------------------------------------------------------------------
    def prune(self, hosts: list[HostAction]) -> dict[str, str | Exception]:
        """Retention on every host (the new release and each prior are kept); returns what
        `current` points at on each, read back by the same call (the error: unreachable)."""

        def one(a: HostAction) -> tuple[str, str | Exception]:
            if a.host in self.current:  # nothing changed there: nothing to prune
                return a.host, self.rollout.release_id
            protect = [self.rollout.release_id, a.prior.release_id if a.prior else ""]
            try:
                ops = self.sessions.ops(a)
                return a.host, ops.prune(self.rollout.retention, protect)["current"]
            except (StepFailed, TransportError) as exc:
                return a.host, exc
            finally:
                # the host's last request: its session ends here, alongside the others'
                # prunes, not in one batch after them all (~0.15 s at 20 hosts)
                self.sessions.release(a.host)

        if not hosts:
            return {}
        with self._pool(len(hosts)) as pool:
            return dict(pool.map(one, hosts))


def _recorded(action: HostAction) -> dict[str, str]:
    """What the CMS records the host as running (its prior), by release id → digest."""
    return {action.prior.release_id: action.prior.digest} if action.prior else {}


def run_hook(ops: HostOps, step: str, command: str | None, context: dict[str, str]) -> dict:
    """Run a rendered plan hook (none: nothing to do); the tail of its output is evidence."""
    if command is None:
        return {}
    return {"output": ops.hook(step, command, context)[-500:]}
