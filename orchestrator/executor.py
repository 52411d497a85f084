"""The push executor: runs a Rollout's waves on real hosts, journaling every step.

Hosts of a wave run in parallel up to the plan's concurrency, each over its own SSH
connection. A host's failure is data (a HostOutcome), never an exception that stops the
others; the milestone decides. A stop request (SIGINT/SIGTERM) is honoured at the next safe
point: between steps, never inside one (every remote step has a timeout).
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from orchestrator.backout import BackoutAction
from orchestrator.errors import FerryError, StepFailed, TransportError
from orchestrator.hostops import HostOps, render
from orchestrator.inventory import SSHSettings
from orchestrator.journal import Journal
from orchestrator.milestone import HostOutcome
from orchestrator.plan import DeployPlan
from orchestrator.planner import Baseline, HostAction, Rollout, WavePlan
from orchestrator.transport.ssh import SSHHost

Progress = Callable[[str], None]


class Interrupted(FerryError):
    pass


@dataclass
class BackoutResult:
    host: str
    restored: bool
    current: str | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "restored": self.restored,
            "current": self.current,
            "warnings": self.warnings,
            "error": self.error,
        }


class ObjectCache:
    """The package's files by sha256, extracted once from the verified DML archive."""

    def __init__(self, package: Any, cache_root: Path) -> None:
        self.package = package
        self.root = cache_root
        self.dir = cache_root / "objects"
        self.sizes = {f.sha256: f.size for f in package.files}
        self._lock = threading.Lock()
        self._frame_locks: dict[str, threading.Lock] = {}
        self._ready = False

    def ensure(self) -> None:
        with self._lock:
            if self._ready:
                return
            self.dir.mkdir(parents=True, exist_ok=True)
            missing = {s for s in self.sizes if not (self.dir / s).is_file()}
            if missing:
                for entry, stream in self.package.iter_files(missing):
                    if (self.dir / entry.sha256).is_file():
                        continue
                    tmp = self.dir / f"{entry.sha256}.tmp"
                    with open(tmp, "wb") as out:
                        while chunk := stream.read(1 << 20):
                            out.write(chunk)
                    tmp.replace(self.dir / entry.sha256)
            self._ready = True

    def frames(self, need: list[str]) -> Path:
        """One file of `<sha256> <size>\\n<bytes>` frames and `END`, per distinct need.

        Hosts that need the same objects (every host of a cold push) share one file, which
        the transport hands to the kernel (sendfile): no Python loop per byte or per host.
        """
        self.ensure()
        wanted = sorted(need)
        key = hashlib.sha256("\n".join(wanted).encode()).hexdigest()[:24]
        path = self.dir.parent / "frames" / key
        with self._lock:
            lock = self._frame_locks.setdefault(key, threading.Lock())
        with lock:
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                with open(tmp, "wb") as out:
                    for sha in wanted:
                        out.write(f"{sha} {self.sizes[sha]}\n".encode())
                        with open(self.dir / sha, "rb") as f:
                            shutil.copyfileobj(f, out, 1 << 20)
                    out.write(b"END\n")
                tmp.replace(path)
        return path


class Executor:
    def __init__(
        self,
        *,
        rollout: Rollout,
        plan: DeployPlan,
        ssh: SSHSettings,
        package: Any,
        public_key_hex: str,
        journal: Journal,
        deployment_id: int,
        cache_root: Path,
        progress: Progress,
        stop: threading.Event,
    ) -> None:
        self.rollout, self.plan, self.ssh = rollout, plan, ssh
        self.package = package
        self.key_hex = public_key_hex
        self.journal = journal
        self.deployment_id = deployment_id
        self.progress = progress
        self.stop = stop
        self.objects = ObjectCache(package, cache_root)
        self.ops: dict[str, HostOps] = {}
        self.touched: dict[str, dict[str, str]] = {}  # host → {step: status}
        self.bytes_sent: dict[str, int] = {}
        self.already: set[str] = set()  # hosts that hold the release intact already
        self._lock = threading.Lock()
        self.templates = {t.dest: t.src.read_text() for t in plan.config}

    # -- connections -----------------------------------------------------------------------
    def host_ops(self, action: HostAction) -> HostOps:
        with self._lock:
            ops = self.ops.get(action.host)
            if ops is None:
                from orchestrator.inventory import Host

                host = Host(
                    name=action.host,
                    address=action.address,
                    port=action.port,
                    groups=(),
                    deploy_root=action.deploy_root,
                )
                conn = SSHHost(host, self.ssh, connect_timeout=self.plan.timeouts.connect)
                ops = self.ops[action.host] = HostOps(
                    conn, action.deploy_root, self.plan.timeouts.step
                )
            return ops

    def close(self) -> None:
        for ops in self.ops.values():
            ops.conn.close()
        for sub in ("objects", "frames"):  # only what this run made
            shutil.rmtree(self.objects.root / sub, ignore_errors=True)

    # -- context for hooks and checks ------------------------------------------------------
    def context(self, action: HostAction, release: str, rid: str | None) -> dict[str, Any]:
        root = action.deploy_root.rstrip("/")
        name, _, version = release.partition("@")
        return {
            **self.plan.vars,
            "host": action.host,
            "address": action.address,
            "environment": self.rollout.environment,
            "release": release,
            "name": name,
            "version": version,
            "release_id": rid or "",
            "release_path": f"{root}/releases/{rid}" if rid else root,
            "deploy_root": root,
            "current": f"{root}/current",
            "shared": f"{root}/shared",
            "snapshot_dir": f"{root}/.ferry/snapshots/{self.deployment_id}",
            "deployment_id": self.deployment_id,
        }

    # -- forward ---------------------------------------------------------------------------
    def run_wave(self, wave: WavePlan) -> list[HostOutcome]:
        self.objects.ensure()
        with ThreadPoolExecutor(max_workers=min(self.plan.concurrency, len(wave.hosts))) as pool:
            return list(pool.map(lambda a: self._deploy_host(wave.index, a), wave.hosts))

    def _step(self, wave: int, host: str, step: str, fn: Callable[[], dict[str, Any] | None]):
        if self.stop.is_set():
            raise Interrupted(f"{host}: stopped before {step}")
        with self._lock:
            self.touched.setdefault(host, {})[step] = "started"
        sid = self.journal.begin(wave, host, step)
        try:
            detail = fn() or {}
        except BaseException as exc:
            with self._lock:
                self.touched[host][step] = "failed"
            self.journal.end(sid, "failed", {"error": str(exc)[-2000:]})
            raise
        with self._lock:
            self.touched[host][step] = "succeeded"
        self.journal.end(sid, "succeeded", detail)
        return detail

    def _deploy_host(self, wave: int, action: HostAction) -> HostOutcome:
        rid = self.rollout.release_id
        ctx = self.context(action, self.rollout.release, rid)
        current = ""
        try:
            ops = self.host_ops(action)
            for step in action.steps:
                current = step
                self._step(wave, action.host, step, partial(self._forward, step, ops, rid, ctx))
            activated = self.touched.get(action.host, {}).get("activate") == "succeeded"
            return HostOutcome(action.host, True, activated=activated)
        except (StepFailed, TransportError, Interrupted) as exc:
            output = getattr(exc, "output", "")
            activated = "activate" in self.touched.get(action.host, {})
            return HostOutcome(action.host, False, current, exc.message, output, activated)

    def _forward(self, step: str, ops: HostOps, rid: str, ctx: dict[str, Any]) -> dict[str, Any]:
        hooks = self.plan.hooks
        if step == "stage":
            return self._stage(ops, rid)
        if step == "verify":
            if ops.name in self.already:  # inspected intact in this very run
                return {"release": rid, "already": True}
            return ops.verify(rid)
        if step == "snapshot":
            return self._hook(ops, step, hooks.snapshot, ctx, f"mkdir -p {ctx['snapshot_dir']} && ")
        if step == "install":
            return self._install(ops, rid, ctx)
        if step == "activate":
            return self._activate(ops, rid, ctx)
        if step == "check":
            return self._hook(ops, step, hooks.verify, ctx)
        raise ValueError(f"unknown step {step}")

    def _render(self, template: str | None, ctx: dict[str, Any], step: str) -> str:
        return render(template or "true", ctx, f"hooks.{step}")

    def _hook(
        self, ops: HostOps, step: str, template: str | None, ctx: dict[str, Any], prefix: str = ""
    ) -> dict[str, Any]:
        """Render a plan hook for this host and run it; the tail of its output is evidence."""
        return {"output": ops.hook(step, prefix + self._render(template, ctx, step), ctx)[-500:]}

    def _stage(self, ops: HostOps, rid: str) -> dict[str, Any]:
        # one call: pin the key; a copy already on the host is trusted only once re-checked
        started = time.monotonic()
        info = ops.inspect(rid, self.key_hex, self.plan.readback == "full")
        inspected = time.monotonic() - started
        if info["have"]:
            with self._lock:
                self.already.add(ops.name)
            return {"bytes_sent": 0, "already": True, "inspect_s": round(inspected, 3)}
        if info["check"].get("set_aside"):
            self.progress(f"  {ops.name}: its copy of {rid} was altered; staging it afresh")
        result = ops.stage(
            rid, self.package.manifest_bytes, self.package.signature, self.objects.frames
        )
        result["inspect_s"] = round(inspected, 3)
        result["transfer_s"] = round(time.monotonic() - started - inspected, 3)
        with self._lock:
            self.bytes_sent[ops.name] = self.bytes_sent.get(ops.name, 0) + result["bytes_sent"]
        return result

    def _install(self, ops: HostOps, rid: str, ctx: dict[str, Any]) -> dict[str, Any]:
        detail: dict[str, Any] = {}
        if self.templates:
            files = {d: render(t, ctx, f"config {d}") for d, t in self.templates.items()}
            detail["config"] = ops.write_config(rid, files)["written"]
        if self.plan.hooks.install:
            detail.update(self._hook(ops, "install", self.plan.hooks.install, ctx))
        return detail

    def _activate(self, ops: HostOps, rid: str, ctx: dict[str, Any]) -> dict[str, Any]:
        detail = ops.switch(rid)
        if self.plan.hooks.activate:
            detail.update(self._hook(ops, "activate", self.plan.hooks.activate, ctx))
        return detail

    # -- milestone checks ------------------------------------------------------------------
    def run_checks(self, wave: WavePlan, outcomes: list[HostOutcome]) -> list[HostOutcome]:
        """After the soak: each healthy host's milestone checks and a read-back of its files."""
        by_host = {a.host: a for a in wave.hosts}

        def one(o: HostOutcome) -> HostOutcome:
            if not o.ok:
                return o
            action = by_host[o.host]
            try:
                ops = self.host_ops(action)
                ctx = self.context(action, self.rollout.release, self.rollout.release_id)
                back = ops.readback(self.rollout.release_id, self.plan.readback == "full")
                if not back.get("ok"):
                    return HostOutcome(
                        o.host, False, "readback", "; ".join(back["mismatches"][:3]), "", True
                    )
                for check in self.plan.milestone.checks:
                    ok, evidence = ops.check(check, ctx)
                    if not ok:
                        return HostOutcome(o.host, False, "milestone", check.label, evidence, True)
            except (StepFailed, TransportError) as exc:
                return HostOutcome(
                    o.host, False, "milestone", exc.message, getattr(exc, "output", ""), True
                )
            return o

        with ThreadPoolExecutor(max_workers=min(self.plan.concurrency, len(outcomes))) as pool:
            return list(pool.map(one, outcomes))

    def soak(self, seconds: float) -> None:
        if seconds > 0:
            self.progress(f"  soaking {seconds:.0f}s before the milestone checks")
            self.stop.wait(seconds)

    # -- backout ---------------------------------------------------------------------------
    def back_out(
        self, actions: list[BackoutAction], by_host: dict[str, HostAction]
    ) -> list[BackoutResult]:
        work = [a for a in actions]
        if not work:
            return []
        with ThreadPoolExecutor(max_workers=min(self.plan.concurrency, len(work))) as pool:
            return list(pool.map(lambda a: self._back_out_host(a, by_host[a.host]), work))

    def _back_out_host(self, action: BackoutAction, host: HostAction) -> BackoutResult:
        prior: Baseline | None = action.prior
        prior_id = prior.release_id if prior else None
        result = BackoutResult(host.host, False)
        wave = -1
        try:
            ops = self.host_ops(host)
            ctx = self.context(host, prior.release if prior else self.rollout.release, prior_id)
            for step in action.steps:
                sid = self.journal.begin(wave, host.host, step)
                try:
                    detail: dict[str, Any] = {}
                    if step == "revert":
                        detail = ops.switch(prior_id, step="revert")
                    elif step == "reactivate" and self.plan.hooks.activate:
                        detail = self._hook(ops, step, self.plan.hooks.activate, ctx)
                    elif step == "restore" and self.plan.hooks.restore:
                        detail = self._hook(ops, step, self.plan.hooks.restore, ctx)
                    elif step == "recheck":
                        detail = self._recheck(ops, ctx)
                    self.journal.end(sid, "succeeded", detail)
                except StepFailed as exc:
                    # a failing hook of the old release is reported, never a trap: go on
                    self.journal.end(
                        sid, "failed", {"error": exc.message, "output": exc.output[-1000:]}
                    )
                    if step == "revert":
                        raise
                    result.warnings.append(f"{step}: {exc.message}")
            back = ops.readback(prior_id, self.plan.readback == "full")
            result.current = back.get("current")
            result.restored = bool(back.get("ok")) and back.get("current") == prior_id
            if not result.restored:
                result.error = "; ".join(back.get("mismatches", [])[:3]) or "read-back differs"
        except (StepFailed, TransportError) as exc:
            result.error = exc.message
        return result

    def _recheck(self, ops: HostOps, ctx: dict[str, Any]) -> dict[str, Any]:
        evidence = []
        if self.plan.hooks.verify:
            self._hook(ops, "recheck", self.plan.hooks.verify, ctx)
            evidence.append("verify hook passed")
        for check in self.plan.milestone.checks:
            ok, ev = ops.check(check, ctx)
            if not ok:
                raise StepFailed(ops.name, "recheck", f"prior release check failed: {ev}")
            evidence.append(ev)
        return {"checks": evidence}

    # -- the end ---------------------------------------------------------------------------
    def prune(self, hosts: list[HostAction]) -> dict[str, str | None]:
        """Retention on every host (the new release and each prior are kept); returns what
        `current` points at on each, read back by the same call (None: unreachable)."""

        def one(a: HostAction) -> tuple[str, str | None]:
            protect = [self.rollout.release_id, a.prior.release_id if a.prior else ""]
            try:
                return a.host, self.host_ops(a).prune(self.plan.retention, protect)["current"]
            except (StepFailed, TransportError) as exc:
                self.progress(f"  {a.host}: not read back: {exc.message}")
                return a.host, None

        with ThreadPoolExecutor(max_workers=min(self.plan.concurrency, len(hosts))) as pool:
            return dict(pool.map(one, hosts))


def elapsed_since(start: float) -> float:
    return time.monotonic() - start
